"""The OpenAI-compatible HTTP server: FastAPI app, protocol schemas, errors, metrics, output store."""
