"""The memory flags of `generate` and `serve` (offload, text-encoder device, VAE tiling), turned into
a MemoryConfig. Light to import (no torch)."""

from __future__ import annotations

import argparse

from ditserve.config.memory import OFFLOAD_MODES, VAE_TILING_MODES, MemoryConfig


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("memory (fit a model that does not fit the GPU)")
    g.add_argument("--cpu-offload", default="none", choices=OFFLOAD_MODES,
                   help="model: each component on the GPU only while its stage runs; layerwise: also stream the "
                        "DiT's blocks from pinned host memory, the next group prefetched (default none)")
    g.add_argument("--offload-group-size", type=int, default=1, metavar="N",
                   help="layerwise: blocks per streamed group (default 1)")
    g.add_argument("--gpu-memory-budget", type=float, default=None, metavar="GIB",
                   help="layerwise: keep as many blocks resident as fit this many GiB, stream the rest "
                        "(default: stream every block)")
    g.add_argument("--text-encoder-device", default=None, choices=["cpu"],
                   help="cpu: run the text encoders on the CPU (default: the engine's device)")
    g.add_argument("--vae-tiling", default="auto", choices=VAE_TILING_MODES,
                   help="decode in overlapping tiles; auto: when the whole decode would not fit the free GPU "
                        "memory, never on CPU (default auto)")
    g.add_argument("--vae-slicing", action="store_true",
                   help="decode a batch one image or video at a time (default: off)")
    g.add_argument("--forward-chunk-size", type=int, default=None, metavar="TOKENS",
                   help="run each DiT block's per-token parts (feed-forward, norms, residuals) over this many "
                        "tokens at a time: a lower activation peak, the same output; 0: off (default: 4096 "
                        "with --cpu-offload layerwise, dropped at the first step when a --gpu-memory-budget "
                        "keeps as many blocks resident without it, or, without a budget, when the unchunked "
                        "activations fit the free GPU memory; else off)")


def memory_config_from_args(args: argparse.Namespace) -> MemoryConfig:
    """The MemoryConfig of the flags; InvalidRequest (one line) for a bad combination."""
    return MemoryConfig(cpu_offload=args.cpu_offload, offload_group_size=args.offload_group_size,
                        gpu_memory_budget_gib=args.gpu_memory_budget, text_encoder_device=args.text_encoder_device,
                        vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing,
                        forward_chunk_size=args.forward_chunk_size)
