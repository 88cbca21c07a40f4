"""diffusers SD3Transformer2DModel keys -> our SD3DiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, linear_keys, load_dit
from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.model import SD3DiT


def _attention_keys(o: str, t: str, *, qkv: tuple[str, str, str], proj: str | None, norms: tuple[str, str] | None,
                    ) -> KeyMap:
    m = linear_keys(f"{o}.qkv", *(f"{t}.{name}" for name in qkv))
    if proj is not None:
        m |= linear_keys(f"{o}.proj", f"{t}.{proj}")
    if norms is not None:
        m[f"{o}.norm.q_norm.weight"] = [f"{t}.{norms[0]}.weight"]
        m[f"{o}.norm.k_norm.weight"] = [f"{t}.{norms[1]}.weight"]
    return m


def sd3_key_map(cfg: SD3Config) -> KeyMap:
    m: KeyMap = {}
    m |= linear_keys("x_embedder", "pos_embed.proj")
    m["pos_table"] = ["pos_embed.pos_embed"]
    for ours, theirs in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder")):
        m |= linear_keys(f"{ours}.in_layer", f"time_text_embed.{theirs}.linear_1")
        m |= linear_keys(f"{ours}.out_layer", f"time_text_embed.{theirs}.linear_2")
    m |= linear_keys("txt_in", "context_embedder")

    qk = cfg.qk_norm is not None
    for i in range(cfg.num_layers):
        o, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        pre_only = i == cfg.num_layers - 1
        m |= linear_keys(f"{o}.img_mod.lin", f"{t}.norm1.linear")
        m |= linear_keys(f"{o}.txt_mod" if pre_only else f"{o}.txt_mod.lin", f"{t}.norm1_context.linear")
        m |= _attention_keys(f"{o}.img_attn", f"{t}.attn", qkv=("to_q", "to_k", "to_v"), proj="to_out.0",
                             norms=("norm_q", "norm_k") if qk else None)
        m |= _attention_keys(f"{o}.txt_attn", f"{t}.attn", qkv=("add_q_proj", "add_k_proj", "add_v_proj"),
                             proj=None if pre_only else "to_add_out",
                             norms=("norm_added_q", "norm_added_k") if qk else None)
        if i in cfg.dual_attention_layers:
            m |= _attention_keys(f"{o}.attn2", f"{t}.attn2", qkv=("to_q", "to_k", "to_v"), proj="to_out.0",
                                 norms=("norm_q", "norm_k") if qk else None)
        mlps = (("img_mlp", "ff"),) if pre_only else (("img_mlp", "ff"), ("txt_mlp", "ff_context"))
        for ours, theirs in mlps:
            m |= linear_keys(f"{o}.{ours}.0", f"{t}.{theirs}.net.0.proj")
            m |= linear_keys(f"{o}.{ours}.2", f"{t}.{theirs}.net.2")

    m |= linear_keys("final_layer.adaLN_modulation", "norm_out.linear")
    m |= linear_keys("final_layer.linear", "proj_out")
    return m


def load_sd3_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> SD3DiT:
    """Build SD3DiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, SD3Config, SD3DiT, sd3_key_map, device, dtype)
