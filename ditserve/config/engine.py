"""Engine configuration: small frozen parts, no global settings object."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from ditserve.api import InvalidRequest
from ditserve.config.memory import MemoryConfig

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


CACHE_METHODS = ("none", "first-block", "dual-block", "teacache")


@dataclass(frozen=True)
class CacheConfig:
    """Step caching (accel/cache.py): skip transformer blocks on denoising steps whose inputs barely
    changed. None picks the method's default; the keys mirror the `--cache-*` flags.

    - `threshold`: relative change below which cached work is reused (teacache: accumulated, rescaled);
      0 never skips.
    - `warmup_steps`: steps at the start that always compute.
    - `fn`, `bn`: dual-block's first and last blocks that always compute (default 8, at most a quarter
      of the blocks, and 0).
    - `taylorseer_order`: 0 reuses the cached residual as it is; 1-2 extrapolate it (TaylorSeer).
    - `max_cached_steps`, `max_consecutive_cached_steps`: caps per branch and run (None: no cap).
    """

    method: str = "none"
    threshold: float | None = None
    warmup_steps: int | None = None
    fn: int | None = None
    bn: int | None = None
    taylorseer_order: int = 0
    max_cached_steps: int | None = None
    max_consecutive_cached_steps: int | None = None

    def __post_init__(self):
        if self.method not in CACHE_METHODS:
            raise InvalidRequest(f"unknown cache method {self.method!r}; use {', '.join(CACHE_METHODS)}", "cache")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0):
            raise InvalidRequest(f"cache threshold must be a number >= 0, got {t!r}", "cache.threshold")
        for name, low in (("warmup_steps", 0), ("fn", 1), ("bn", 0), ("max_cached_steps", 0),
                          ("max_consecutive_cached_steps", 1)):
            _check_count(getattr(self, name), name, low)
        if self.taylorseer_order not in (0, 1, 2) or isinstance(self.taylorseer_order, bool):
            raise InvalidRequest(f"cache taylorseer_order must be 0, 1 or 2, got {self.taylorseer_order!r}",
                                 "cache.taylorseer_order")
        given = [f.name for f in fields(self) if f.name != "method" and getattr(self, f.name) != f.default]
        if self.method == "none" and given:
            raise InvalidRequest(f"cache settings ({', '.join(given)}) given without a cache method", "cache")
        if self.method != "dual-block" and (self.fn is not None or self.bn is not None):
            raise InvalidRequest(f"cache fn/bn apply to dual-block, not {self.method}", "cache.fn")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @classmethod
    def from_mapping(cls, value: "CacheConfig | Mapping | str | None") -> "CacheConfig":
        """A CacheConfig from the Python API's `cache=`: a dict of the keys above, a method name, None."""
        if value is None:
            return cls()
        if isinstance(value, CacheConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, Mapping):
            raise InvalidRequest(f"cache must be a dict, a method name or None, got {type(value).__name__}", "cache")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequest(f"unknown cache key(s) {', '.join(map(str, unknown))}; use {', '.join(sorted(known))}",
                                 "cache")
        return cls(**value)


def _check_count(value, name: str, low: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise InvalidRequest(f"cache {name} must be an integer >= {low}, got {value!r}", f"cache.{name}")


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
    # with compile: norms and the fp8 activation quantiser as one-pass reductions inside inductor's
    # producing kernels (accel/compile.py `wide_rows`) instead of a separate quantise pass; off until the
    # GPU profile shows it faster (benchmarks/diagnose_step.py's `+rows` variants)
    row_fusion: bool = False
    # fp8 linears with cuBLASLt's fast accumulation (partial sums not promoted to float32 along K): on the
    # H200, SD3.5-Large's fp8 step 100.3 -> 95.6 ms (GEMMs 40.4 -> 35.7) at a step rel L2 of 1.7e-3 against
    # the promoted sum (benchmarks/results/sd3.5-large_rows_diagnose_h200.json)
    fp8_fast_accum: bool = True
    cache: CacheConfig = field(default_factory=CacheConfig)  # step caching (none by default)

    def __post_init__(self):
        if self.quantization not in (None, "fp8"):
            raise InvalidRequest(f"unsupported quantization {self.quantization!r}; use fp8", "quantization")
        if self.attention not in ("auto", "sdpa", "fa3", "sage", "fp8"):
            raise InvalidRequest(f"unsupported attention backend {self.attention!r}", "attention")


@dataclass(frozen=True)
class ParallelConfig:
    """How one request is split across GPUs (ranks), and how many engine replicas there are.

    `num_gpus` = cfg (2 with `cfg_parallel`) x `ulysses_degree` x `ring_degree` x `tp_size` x
    `num_replicas`; on a machine without GPUs the ranks are CPU processes over gloo. Across machines
    (`nnodes` > 1) every node runs num_gpus / nnodes ranks under torchrun, meeting at
    `master_addr:master_port`; the engine then waits for rank 0 at port `master_port + 1`, which
    proves itself with the secret in `auth_key_file` (both sides read it). `vae_parallel`: video
    decoding split across a replica's ranks.
    """

    num_gpus: int = 1
    cfg_parallel: bool = False
    ulysses_degree: int = 1
    ring_degree: int = 1
    tp_size: int = 1
    num_replicas: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    auth_key_file: str | None = None
    vae_parallel: bool = False

    def __post_init__(self):
        for name in ("num_gpus", "ulysses_degree", "ring_degree", "tp_size", "num_replicas", "nnodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequest(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}", name)
        product = self.cfg_degree * self.ulysses_degree * self.ring_degree * self.tp_size * self.num_replicas
        if product != self.num_gpus:
            raise InvalidRequest(
                f"--num-gpus {self.num_gpus} must equal cfg {self.cfg_degree} x ulysses {self.ulysses_degree} x "
                f"ring {self.ring_degree} x tp {self.tp_size} x replicas {self.num_replicas} = {product}", "num_gpus")
        if self.num_gpus % self.nnodes:
            raise InvalidRequest(f"--num-gpus {self.num_gpus} is not a multiple of --nnodes {self.nnodes}", "nnodes")
        if not 0 <= self.node_rank < self.nnodes:
            raise InvalidRequest(f"--node-rank {self.node_rank} must be in [0, {self.nnodes})", "node_rank")
        if self.nnodes > 1 and self.num_replicas > 1:
            raise InvalidRequest(f"--num-replicas {self.num_replicas} with --nnodes {self.nnodes}: replicas run "
                                 "on one machine; start one server per machine instead", "num_replicas")
        if not 0 < self.master_port < 65535:
            raise InvalidRequest(f"--master-port {self.master_port} is not a port number below 65535", "master_port")
        if self.nnodes > 1 and not self.auth_key_file:
            raise InvalidRequest(f"--nnodes {self.nnodes} needs --auth-key-file: a secret file that every machine "
                                 "reads, so that only your ranks can join", "auth_key_file")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def sp_degree(self) -> int:
        """Ranks that share one sequence (Ulysses x Ring)."""
        return self.ulysses_degree * self.ring_degree

    @property
    def group_size(self) -> int:
        """Ranks of one replica: the world size of its process group."""
        return self.num_gpus // self.num_replicas

    @property
    def enabled(self) -> bool:
        return self.num_gpus > 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    max_batch_size: int = 1
    accel: AccelConfig = AccelConfig()
    parallel: ParallelConfig = ParallelConfig()
    memory: MemoryConfig = MemoryConfig()  # offload, text-encoder device, VAE tiling
