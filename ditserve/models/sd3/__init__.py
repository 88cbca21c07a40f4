from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.model import SD3DiT, SD3Inputs

__all__ = ["SD3Config", "SD3DiT", "SD3Inputs"]
