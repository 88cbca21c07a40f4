"""The engine flags shared by `generate` and `serve`: model, speed transforms, step caching and the
parallel engine, turned into one EngineConfig. Importing this module stays light (no torch): the
parser is built on every CLI call."""

from __future__ import annotations

import argparse

from ditserve.config.engine import CACHE_METHODS, AccelConfig, CacheConfig, EngineConfig, ModelConfig
from ditserve.cli.memory_args import add_memory_arguments, memory_config_from_args
from ditserve.parallel.args import add_parallel_arguments, parallel_config_from_args


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate and serve."""
    p.add_argument("--model-path", metavar="DIR_OR_HF_ID", default=None,
                   help="diffusers model directory or Hugging Face id (default: $DITSERVE_DEFAULT_MODEL, "
                        "else the bundled demo model; ditserve-demo-video: the bundled video demo)")
    p.add_argument("--device", metavar="DEVICE", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--enable-torch-compile", action="store_true",
                   help="compile the DiT per block (and replay steps as CUDA graphs on GPU); warms up at start")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: e4m3 linear layers through torch._scaled_mm (CUDA) (default: none)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "fa3", "sage", "fp8"],
                   help="auto/sdpa: torch SDPA (cuDNN on Hopper); fa3, sage: when installed (CUDA); fp8: cuDNN fp8 SDPA "
                        "with smoothed K and V (Hopper, nvidia-cudnn-frontend)")
    add_cache_arguments(p)
    add_memory_arguments(p)
    add_parallel_arguments(p)


def engine_config(args: argparse.Namespace, model: str, **kw) -> EngineConfig:
    """The EngineConfig the flags describe (`kw`: EngineConfig's other fields); InvalidRequest (one
    line) for a bad value, before anything loads."""
    accel = AccelConfig(compile=args.enable_torch_compile, quantization=args.quantization,
                        attention=args.attention_backend, cache=cache_config_from_args(args))
    return EngineConfig(ModelConfig(model, args.device, args.dtype), accel=accel,
                        parallel=parallel_config_from_args(args), memory=memory_config_from_args(args), **kw)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--cache*` flags; `cache_config_from_args` turns them into a CacheConfig."""
    g = parser.add_argument_group("step caching (skip transformer blocks on steps that barely change)")
    g.add_argument("--cache", default="none", metavar="METHOD",
                   help=f"{' | '.join(CACHE_METHODS)} (default none)")
    g.add_argument("--cache-threshold", type=float, default=None, metavar="F",
                   help="relative change below which cached work is reused; 0 never skips (default: the method's)")
    g.add_argument("--cache-warmup-steps", type=int, default=None, metavar="N", help="first steps always computed (default: the method's)")
    g.add_argument("--cache-fn", type=int, default=None, metavar="N",
                   help="dual-block: first blocks always computed (default 8, at most a quarter of the blocks)")
    g.add_argument("--cache-bn", type=int, default=None, metavar="N",
                   help="dual-block: last blocks always computed (default 0)")
    g.add_argument("--cache-taylorseer-order", type=int, default=0, metavar="K",
                   help="extrapolate cached residuals with TaylorSeer of order 1-2 (0 = off)")
    g.add_argument("--cache-max-cached-steps", type=int, default=None, metavar="N",
                   help="at most N cached steps per run and branch (default: no cap)")
    g.add_argument("--cache-max-consecutive-cached-steps", type=int, default=None, metavar="N",
                   help="at most N cached steps in a row (default: no cap)")


def cache_config_from_args(args: argparse.Namespace) -> CacheConfig:
    """The CacheConfig of the `--cache*` flags; InvalidRequest (one line) for a bad value."""
    return CacheConfig(method=args.cache, threshold=args.cache_threshold, warmup_steps=args.cache_warmup_steps,
                       fn=args.cache_fn, bn=args.cache_bn, taylorseer_order=args.cache_taylorseer_order,
                       max_cached_steps=args.cache_max_cached_steps,
                       max_consecutive_cached_steps=args.cache_max_consecutive_cached_steps)
