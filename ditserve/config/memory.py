"""How a model is fitted into GPU memory: component and layerwise CPU offload, where the text
encoders run, VAE tiling and slicing (accel/offload.py, vae/memory.py apply it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ditserve.api import InvalidRequest

OFFLOAD_MODES = ("none", "model", "layerwise")
VAE_TILING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class MemoryConfig:
    """- `cpu_offload`: "none" (everything resident), "model" (each component — text encoders, DiT(s),
      VAE — on the execution device only while its stage runs, in pinned host memory otherwise) or
      "layerwise" ("model", and the DiTs' blocks stream from host memory group by group, the next
      group prefetched on a side CUDA stream).
    - `offload_group_size`: blocks per streamed group (layerwise).
    - `gpu_memory_budget_gib`: layerwise: keep as many blocks resident as fit this budget beside the
      activations (estimated at the DiT's first call), stream only the rest (None: stream every block).
    - `text_encoder_device`: "cpu" runs the text encoders on the CPU (None: the engine's device).
    - `vae_tiling`: decode in spatial tiles — "on", "off", or "auto": on when the decode would not
      fit the free GPU memory (never on the CPU); `vae_slicing`: decode a batch one sample at a time.
    - `vae_tile_size`: tile side in pixels (None: the VAE's own default, as diffusers').
    - `forward_chunk_size`: run the parts of each DiT block that map every token on its own (the
      feed-forward, and where the model's plan allows the norms, residuals and projections around it)
      over this many tokens at a time (diffusers' `enable_forward_chunking`): the activation peak of a
      long video drops to about 0.6x, the output is unchanged. 0: off; None: automatic (4096 tokens
      under `cpu_offload="layerwise"`, else off; dropped at the DiT's first call when the unchunked
      activations leave as many blocks resident under a budget, or, without one, fit the free memory).
    """

    cpu_offload: str = "none"
    offload_group_size: int = 1
    gpu_memory_budget_gib: float | None = None
    text_encoder_device: str | None = None
    vae_tiling: str = "auto"
    vae_slicing: bool = False
    vae_tile_size: int | None = None
    forward_chunk_size: int | None = None

    def __post_init__(self):
        if self.cpu_offload not in OFFLOAD_MODES:
            raise InvalidRequest(f"unknown --cpu-offload {self.cpu_offload!r}; use {', '.join(OFFLOAD_MODES)}",
                                 "cpu_offload")
        n = self.offload_group_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRequest(f"--offload-group-size must be a positive integer, got {n!r}", "offload_group_size")
        b = self.gpu_memory_budget_gib
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
                raise InvalidRequest(f"--gpu-memory-budget must be a positive number of GiB, got {b!r}",
                                     "gpu_memory_budget_gib")
            if self.cpu_offload != "layerwise":
                raise InvalidRequest("--gpu-memory-budget applies to --cpu-offload layerwise (it chooses how many "
                                     "blocks stay resident)", "gpu_memory_budget_gib")
        if self.text_encoder_device not in (None, "cpu"):
            raise InvalidRequest(f"--text-encoder-device must be cpu, got {self.text_encoder_device!r}",
                                 "text_encoder_device")
        if self.vae_tiling not in VAE_TILING_MODES:
            raise InvalidRequest(f"unknown --vae-tiling {self.vae_tiling!r}; use {', '.join(VAE_TILING_MODES)}",
                                 "vae_tiling")
        t = self.vae_tile_size
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 16 or t % 8):
            raise InvalidRequest(f"vae_tile_size must be a multiple of 8 pixels, at least 16, got {t!r}",
                                 "vae_tile_size")
        c = self.forward_chunk_size
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise InvalidRequest(f"--forward-chunk-size must be a number of tokens (0: off), got {c!r}",
                                 "forward_chunk_size")

    @property
    def offload(self) -> bool:
        return self.cpu_offload != "none"


def memory_config(cpu_offload: str = "none", memory: MemoryConfig | dict | None = None) -> MemoryConfig:
    """The Python API's `cpu_offload=` and `memory=` (a MemoryConfig, or a dict of its keys) as one
    MemoryConfig; unknown keys refused in one line."""
    if isinstance(memory, MemoryConfig):
        return memory if cpu_offload == "none" else replace(memory, cpu_offload=cpu_offload)
    if memory is not None and not isinstance(memory, dict):
        raise InvalidRequest(f"memory must be a dict or a MemoryConfig, got {type(memory).__name__}", "memory")
    memory = dict(memory or {})
    known = [f.name for f in fields(MemoryConfig)]
    unknown = sorted(set(memory) - set(known))
    if unknown:
        raise InvalidRequest(f"unknown memory key(s) {', '.join(map(str, unknown))}; use {', '.join(known)}", "memory")
    memory.setdefault("cpu_offload", cpu_offload)
    return MemoryConfig(**memory)
