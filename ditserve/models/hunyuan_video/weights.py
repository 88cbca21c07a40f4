"""diffusers HunyuanVideoTransformer3DModel keys -> our HunyuanVideoDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, linear_keys, load_dit
from ditserve.models.flux.weights import stream_keys
from ditserve.models.hunyuan_video.config import HunyuanVideoConfig
from ditserve.models.hunyuan_video.model import HunyuanVideoDiT


def _refiner_keys() -> KeyMap:
    m: KeyMap = {}
    t = "context_embedder"
    m |= linear_keys("txt_in.time_in.in_layer", f"{t}.time_text_embed.timestep_embedder.linear_1")
    m |= linear_keys("txt_in.time_in.out_layer", f"{t}.time_text_embed.timestep_embedder.linear_2")
    m |= linear_keys("txt_in.pooled_in.in_layer", f"{t}.time_text_embed.text_embedder.linear_1")
    m |= linear_keys("txt_in.pooled_in.out_layer", f"{t}.time_text_embed.text_embedder.linear_2")
    m |= linear_keys("txt_in.proj_in", f"{t}.proj_in")
    return m


def _refiner_block_keys(o: str, t: str) -> KeyMap:
    m: KeyMap = {}
    m |= linear_keys(f"{o}.norm1", f"{t}.norm1")
    m |= linear_keys(f"{o}.norm2", f"{t}.norm2")
    m |= linear_keys(f"{o}.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
    m |= linear_keys(f"{o}.proj", f"{t}.attn.to_out.0")
    m |= linear_keys(f"{o}.mlp.0", f"{t}.ff.net.0.proj")
    m |= linear_keys(f"{o}.mlp.2", f"{t}.ff.net.2")
    m |= linear_keys(f"{o}.gates", f"{t}.norm_out.linear")
    return m


def hunyuan_video_key_map(cfg: HunyuanVideoConfig) -> KeyMap:
    m: KeyMap = {}
    m |= linear_keys("img_in", "x_embedder.proj")
    m |= _refiner_keys()
    for i in range(cfg.num_refiner_layers):
        m |= _refiner_block_keys(f"txt_in.blocks.{i}", f"context_embedder.token_refiner.refiner_blocks.{i}")
    return m | stream_keys(cfg)


def load_hunyuan_video_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> HunyuanVideoDiT:
    """Build HunyuanVideoDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, HunyuanVideoConfig, HunyuanVideoDiT, hunyuan_video_key_map, device, dtype)
