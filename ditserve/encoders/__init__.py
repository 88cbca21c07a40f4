"""Text and image encoders (transformers classes) behind small, typed wrappers."""
