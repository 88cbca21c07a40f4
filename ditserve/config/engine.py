"""Engine configuration: small frozen parts, no global settings object."""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.api import InvalidRequest

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def parse_dtype(dtype, device: str):
    """A torch dtype from a name or a torch dtype; None picks bfloat16 on GPU, float32 on CPU."""
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InvalidRequest(f"unsupported dtype {dtype}; use float32, bfloat16 or float16", "dtype")
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise InvalidRequest(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16", "dtype")
    return getattr(torch, name)


def parse_device(device: str | None) -> str:
    """'cuda' when available unless asked otherwise; a missing GPU is the caller's error."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise InvalidRequest(f"unsupported device {device!r}; use cpu or cuda", "device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device cuda requested but no CUDA GPU is available", "device")
    return device


@dataclass(frozen=True)
class ModelConfig:
    path: str
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class AccelConfig:
    """Speed transforms for the DiT. GPU-only ones are skipped on CPU."""

    compile: bool = False  # torch.compile per block, warmed up at start
    cuda_graphs: bool = True  # with compile on CUDA: replay each step as one CUDA graph
    quantization: str | None = None  # "fp8": e4m3 linears via torch._scaled_mm (CUDA)
    attention: str = "auto"  # sdpa | fa3 | sage (the latter two when installed; CUDA)
    # Triton QK-norm + RoPE and fp8 activation quantisation (CUDA with Triton; elsewhere the
    # reference ops run). tests/gpu checks them against the reference on the device.
    fused_kernels: bool = True

    def __post_init__(self):
        if self.quantization not in (None, "fp8"):
            raise InvalidRequest(f"unsupported quantization {self.quantization!r}; use fp8", "quantization")
        if self.attention not in ("auto", "sdpa", "fa3", "sage"):
            raise InvalidRequest(f"unsupported attention backend {self.attention!r}", "attention")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    max_batch_size: int = 1
    accel: AccelConfig = AccelConfig()
