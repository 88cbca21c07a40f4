"""diffusers CogVideoXTransformer3DModel keys -> our CogVideoXDiT keys, and the loader (meta build,
single or sharded safetensors, one tensor in flight at a time)."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXDiT
from ditserve.models.common.loading import KeyMap, load_dit
from ditserve.models.common.loading import linear_keys as _linear


def _weights(ours: str, theirs: str, bias: bool = True) -> KeyMap:
    m = {f"{ours}.weight": [f"{theirs}.weight"]}
    if bias:
        m[f"{ours}.bias"] = [f"{theirs}.bias"]
    return m


def _block(o: str, t: str, cfg: CogVideoXConfig) -> KeyMap:
    m: KeyMap = {}
    for norm in ("norm1", "norm2"):
        m |= _linear(f"{o}.{norm}.linear", f"{t}.{norm}.linear")
        if cfg.norm_elementwise_affine:
            m |= _weights(f"{o}.{norm}.norm", f"{t}.{norm}.norm")
    for name in ("to_q", "to_k", "to_v"):
        m |= _weights(f"{o}.attn.{name}", f"{t}.attn1.{name}", cfg.attention_bias)
    m |= _linear(f"{o}.attn.to_out", f"{t}.attn1.to_out.0")
    m |= _weights(f"{o}.attn.norm_q", f"{t}.attn1.norm_q") | _weights(f"{o}.attn.norm_k", f"{t}.attn1.norm_k")
    m |= _linear(f"{o}.ff.0", f"{t}.ff.net.0.proj") | _linear(f"{o}.ff.2", f"{t}.ff.net.2")
    return m


def cogvideox_key_map(cfg: CogVideoXConfig) -> KeyMap:
    """Each CogVideoXDiT parameter -> the diffusers checkpoint tensor that fills it."""
    m = _weights("patch", "patch_embed.proj", cfg.patch_bias or cfg.patch_size_t is not None)
    m |= _linear("text_proj", "patch_embed.text_proj")
    if cfg.use_learned_positional_embeddings:
        m["pos_embedding"] = ["patch_embed.pos_embedding"]
    for ours, theirs in (("time_in", "time_embedding"), ("ofs_in", "ofs_embedding")):
        if ours == "time_in" or cfg.ofs_embed_dim:
            m |= _linear(f"{ours}.in_layer", f"{theirs}.linear_1") | _linear(f"{ours}.out_layer", f"{theirs}.linear_2")
    for k in range(cfg.num_layers):
        m |= _block(f"layers.{k}", f"transformer_blocks.{k}", cfg)
    h = "head_out"
    if cfg.norm_elementwise_affine:
        m |= _weights(f"{h}.norm_final", "norm_final") | _weights(f"{h}.norm_out", "norm_out.norm")
    m |= _linear(f"{h}.mod", "norm_out.linear") | _linear(f"{h}.proj_out", "proj_out")
    return m


def load_cogvideox_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> CogVideoXDiT:
    """Build CogVideoXDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, CogVideoXConfig, CogVideoXDiT, cogvideox_key_map, device, dtype)
