"""diffusers HunyuanVideoTransformer3DModel keys -> our HunyuanVideoDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, double_block_keys, linear_keys, load_dit
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
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embeds:
        embedders["guidance_in"] = "guidance_embedder"
    for ours, theirs in embedders.items():
        m |= linear_keys(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        m |= linear_keys(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")

    for i in range(cfg.num_layers):
        m |= double_block_keys(f"double_blocks.{i}", f"transformer_blocks.{i}", img_mod="norm1.linear",
                               txt_mod="norm1_context.linear", img_mlp="ff", txt_mlp="ff_context")

    for i in range(cfg.num_single_layers):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m |= linear_keys(f"{o}.modulation.lin", f"{t}.norm.linear")
        m |= linear_keys(f"{o}.linear1", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp")
        m |= linear_keys(f"{o}.linear2", f"{t}.proj_out")
        m[f"{o}.norm.q_norm.weight"] = [f"{t}.attn.norm_q.weight"]
        m[f"{o}.norm.k_norm.weight"] = [f"{t}.attn.norm_k.weight"]

    m |= linear_keys("final_layer.adaLN_modulation", "norm_out.linear")
    m |= linear_keys("final_layer.linear", "proj_out")
    return m


def load_hunyuan_video_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> HunyuanVideoDiT:
    """Build HunyuanVideoDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, HunyuanVideoConfig, HunyuanVideoDiT, hunyuan_video_key_map, device, dtype)
