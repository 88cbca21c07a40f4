from ditserve.models.hunyuan_video.config import HunyuanVideoConfig
from ditserve.models.hunyuan_video.model import HunyuanVideoDiT, HunyuanVideoInputs

__all__ = ["HunyuanVideoConfig", "HunyuanVideoDiT", "HunyuanVideoInputs"]
