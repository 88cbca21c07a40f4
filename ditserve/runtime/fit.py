"""Will the model fit? The weights' size read from the safetensors headers of a model folder (no
weights load), against the GPU's free memory, so that `generate` and `serve` can say in one line,
before loading, that a run would not fit and which flag helps."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from ditserve.config import EngineConfig
from ditserve.config.memory import MemoryConfig

log = logging.getLogger(__name__)

GIB = 2**30
_TEXT = "text_encoder"


def component_bytes(path: Path, dtype_bytes: int) -> dict[str, int]:
    """Bytes of each component folder's weights once loaded in a `dtype_bytes`-byte float dtype
    (from the safetensors headers: element counts, not file sizes)."""
    sizes = {}
    for folder in sorted(p for p in Path(path).iterdir() if p.is_dir()):
        total = sum(_numel(f) for f in folder.glob("*.safetensors")) * dtype_bytes
        if total:
            sizes[folder.name] = total
    return sizes


def _numel(file: Path) -> int:
    with open(file, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    count = 0
    for name, entry in header.items():
        if name != "__metadata__":
            n = 1
            for d in entry["shape"]:
                n *= d
            count += n
    return count


def fit_warning(sizes: dict[str, int], free: int, memory: MemoryConfig) -> str | None:
    """One line when the run clearly would not fit `free` bytes of GPU memory, naming the flag that
    helps; None when it may fit (or nothing would help)."""
    if not sizes:
        return None
    total, largest = sum(sizes.values()), max(sizes.values())
    biggest = max(sizes, key=sizes.get)
    text = sum(v for k, v in sizes.items() if k.startswith(_TEXT))
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    if memory.cpu_offload == "none":
        resident = total - (text if memory.text_encoder_device == "cpu" else 0)
        if resident <= free:
            return None
        flag = "--cpu-offload model" if largest <= free else "--cpu-offload layerwise"
        return (f"the model's weights need {gib(resident)} but the GPU has {gib(free)} free: this run will run "
                f"out of memory; try {flag}")
    if memory.cpu_offload == "model" and largest > free:
        if biggest.startswith(_TEXT) and memory.text_encoder_device != "cpu":
            flag = "--text-encoder-device cpu"
        else:
            flag = "--cpu-offload layerwise"
        return (f"{biggest} alone needs {gib(largest)} but the GPU has {gib(free)} free, even with --cpu-offload "
                f"model; try {flag}")
    budget = memory.gpu_memory_budget_gib
    if memory.cpu_offload == "layerwise" and budget is not None and budget * GIB > free:
        return (f"--gpu-memory-budget {budget:g} is more than the {gib(free)} the GPU has free; "
                f"try --gpu-memory-budget {max(1, int(free / GIB) - 1)}")
    return None


def warn_if_too_big(config: EngineConfig, model_path: Path) -> str | None:
    """Log `fit_warning` for this engine's model on its GPU (nothing without CUDA, with tensor
    parallelism or when the folder cannot be read); returns the line."""
    import torch

    from ditserve.config import parse_device, parse_dtype

    device = parse_device(config.model.device)
    if not device.startswith("cuda") or not torch.cuda.is_available() or config.parallel.tp_size > 1:
        return None
    try:
        sizes = component_bytes(model_path, torch.finfo(parse_dtype(config.model.dtype, device)).bits // 8)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    line = fit_warning(sizes, free, config.memory)
    if line:
        log.warning(line)
    return line
