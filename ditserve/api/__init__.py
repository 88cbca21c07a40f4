"""Request, output and error types. Plain Python: no torch import here."""

from ditserve.api.errors import Cancelled, DitserveError, EngineError, InvalidRequest, Overloaded
from ditserve.api.request import GenerationRequest, ModelLimits, RequestDefaults
from ditserve.api.output import GenerationOutput, Timings

__all__ = [
    "Cancelled",
    "DitserveError",
    "EngineError",
    "GenerationOutput",
    "GenerationRequest",
    "InvalidRequest",
    "ModelLimits",
    "Overloaded",
    "RequestDefaults",
    "Timings",
]
