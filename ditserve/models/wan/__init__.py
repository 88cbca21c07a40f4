"""Wan 2.1 / 2.2 video DiT."""

from ditserve.models.wan.config import WanConfig
from ditserve.models.wan.model import WanDiT, WanInputs

__all__ = ["WanConfig", "WanDiT", "WanInputs"]
