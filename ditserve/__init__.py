"""ditserve: inference and serving for diffusion transformers."""

from ditserve.api import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
)

__version__ = "0.1.0"
__all__ = ["EngineError", "GenerationOutput", "GenerationRequest", "Generator", "InvalidRequest", "Overloaded"]


def __getattr__(name: str):
    # Generator pulls in torch, transformers and diffusers: import it only when asked for.
    if name == "Generator":
        from ditserve.runtime.generator import Generator

        return Generator
    raise AttributeError(f"module 'ditserve' has no attribute {name!r}")
