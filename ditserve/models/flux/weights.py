"""diffusers FluxTransformer2DModel keys -> our FluxDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, load_into
from ditserve.models.flux.config import FluxConfig
from ditserve.models.flux.model import FluxDiT


def _linear(ours: str, *theirs: str) -> KeyMap:
    return {
        f"{ours}.weight": [f"{t}.weight" for t in theirs],
        f"{ours}.bias": [f"{t}.bias" for t in theirs],
    }


def flux_key_map(cfg: FluxConfig) -> KeyMap:
    m: KeyMap = {}
    m |= _linear("img_in", "x_embedder")
    m |= _linear("txt_in", "context_embedder")
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder"}
    if cfg.guidance_embeds:
        embedders["guidance_in"] = "guidance_embedder"
    for ours, theirs in embedders.items():
        m |= _linear(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        m |= _linear(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")

    for i in range(cfg.num_layers):
        o, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        m |= _linear(f"{o}.img_mod.lin", f"{t}.norm1.linear")
        m |= _linear(f"{o}.txt_mod.lin", f"{t}.norm1_context.linear")
        m |= _linear(f"{o}.img_attn.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
        m |= _linear(f"{o}.txt_attn.qkv", f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")
        m |= _linear(f"{o}.img_attn.proj", f"{t}.attn.to_out.0")
        m |= _linear(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")
        m[f"{o}.img_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_q.weight"]
        m[f"{o}.img_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_k.weight"]
        m[f"{o}.txt_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_added_q.weight"]
        m[f"{o}.txt_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_added_k.weight"]
        m |= _linear(f"{o}.img_mlp.0", f"{t}.ff.net.0.proj")
        m |= _linear(f"{o}.img_mlp.2", f"{t}.ff.net.2")
        m |= _linear(f"{o}.txt_mlp.0", f"{t}.ff_context.net.0.proj")
        m |= _linear(f"{o}.txt_mlp.2", f"{t}.ff_context.net.2")

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
    folder = Path(folder)
    cfg = FluxConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = FluxDiT(cfg)
    load_into(model, folder, flux_key_map(cfg), device, dtype)
    return model.eval()
