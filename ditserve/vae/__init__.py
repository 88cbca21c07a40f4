"""VAE loading and decoding (diffusers classes)."""
