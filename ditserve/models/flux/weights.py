"""diffusers FluxTransformer2DModel keys -> our FluxDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, double_block_keys, load_dit
from ditserve.models.common.loading import linear_keys as _linear
from ditserve.models.flux.config import FluxConfig
from ditserve.models.flux.model import FluxDiT


def flux_key_map(cfg: FluxConfig) -> KeyMap:
    m: KeyMap = {}
    m |= _linear("img_in", "x_embedder")
    m |= _linear("txt_in", "context_embedder")
    return m | stream_keys(cfg)


def stream_keys(cfg) -> KeyMap:
    """FLUX's conditioning embedders, double- and single-stream blocks and final layer, as diffusers
    names them (shared by HunyuanVideo, whose transformer names these parts alike). `cfg`: anything
    with `guidance_embeds`, `num_layers` and `num_single_layers`."""
    m: KeyMap = {}
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embeds:
        embedders["guidance_in"] = "guidance_embedder"
    for ours, theirs in embedders.items():
        m |= _linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        m |= _linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")

    for i in range(cfg.num_layers):
        m |= double_block_keys(f"double_blocks.{i}", f"transformer_blocks.{i}", img_mod="norm1.linear",
                               txt_mod="norm1_context.linear", img_mlp="ff", txt_mlp="ff_context")

    for i in range(cfg.num_single_layers):
        o, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        m |= _linear(f"{o}.modulation.lin", f"{t}.norm.linear")
        m |= _linear(f"{o}.linear1", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp")
        m |= _linear(f"{o}.linear2", f"{t}.proj_out")
        m[f"{o}.norm.q_norm.weight"] = [f"{t}.attn.norm_q.weight"]
        m[f"{o}.norm.k_norm.weight"] = [f"{t}.attn.norm_k.weight"]

    m |= _linear("final_layer.adaLN_modulation", "norm_out.linear")
    m |= _linear("final_layer.linear", "proj_out")
    return m


def load_flux_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> FluxDiT:
    """Build FluxDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, FluxConfig, FluxDiT, flux_key_map, device, dtype)
