"""CogVideoX (2B, 5B, 1.5-5B) video DiT."""

from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXDiT, CogVideoXInputs

__all__ = ["CogVideoXConfig", "CogVideoXDiT", "CogVideoXInputs"]
