from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT

__all__ = ["QwenImageConfig", "QwenImageDiT"]
