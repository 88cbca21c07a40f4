from ditserve.models.flux.config import FluxConfig
from ditserve.models.flux.model import FluxDiT

__all__ = ["FluxConfig", "FluxDiT"]
