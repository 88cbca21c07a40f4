"""diffusers WanTransformer3DModel keys -> our WanDiT keys, and the loader (meta build, single or
sharded safetensors, one tensor in flight at a time)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, load_into
from ditserve.models.common.loading import linear_keys as _linear
from ditserve.models.wan.config import WanConfig
from ditserve.models.wan.model import WanDiT

log = logging.getLogger(__name__)

# diffusers' `_keep_in_fp32_modules` for this class: a checkpoint tensor whose dotted path has one
# of these components is loaded in float32 whatever the load dtype (time embedder, modulation
# tables, the block norms: in Wan only the affine cross-attention norm2 and the image embedder's
# norm1/norm2 have weights)
KEEP_FLOAT32 = frozenset({"rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"})
# tensors diffusers skips on load (`_keys_to_ignore_on_load_unexpected`): some Wan 2.1 I2V
# checkpoints carry an unused query norm for the image tokens
IGNORED = re.compile("norm_added_q")


def keeps_float32(checkpoint_key: str) -> bool:
    return not KEEP_FLOAT32.isdisjoint(checkpoint_key.split("."))


def _norm(ours: str, theirs: str, bias: bool = True) -> KeyMap:
    m = {f"{ours}.weight": [f"{theirs}.weight"]}
    if bias:
        m[f"{ours}.bias"] = [f"{theirs}.bias"]
    return m


def _attention(o: str, t: str, image_kv: bool) -> KeyMap:
    m: KeyMap = {}
    for name in ("to_q", "to_k", "to_v"):
        m |= _linear(f"{o}.{name}", f"{t}.{name}")
    m |= _linear(f"{o}.to_out", f"{t}.to_out.0")
    m |= _norm(f"{o}.norm_q", f"{t}.norm_q", bias=False) | _norm(f"{o}.norm_k", f"{t}.norm_k", bias=False)
    if image_kv:
        m |= _linear(f"{o}.add_k_proj", f"{t}.add_k_proj") | _linear(f"{o}.add_v_proj", f"{t}.add_v_proj")
        m |= _norm(f"{o}.norm_added_k", f"{t}.norm_added_k", bias=False)
    return m


def _embedders(cfg: WanConfig) -> KeyMap:
    c = "condition_embedder"
    m: KeyMap = {"patch_embedding.weight": ["patch_embedding.weight"], "patch_embedding.bias": ["patch_embedding.bias"]}
    m |= _linear("time_in.in_layer", f"{c}.time_embedder.linear_1")
    m |= _linear("time_in.out_layer", f"{c}.time_embedder.linear_2")
    m |= _linear("time_proj", f"{c}.time_proj")
    m |= _linear("text_in.0", f"{c}.text_embedder.linear_1") | _linear("text_in.2", f"{c}.text_embedder.linear_2")
    if cfg.image_dim:
        i = f"{c}.image_embedder"
        m |= _norm("image_in.norm1", f"{i}.norm1") | _norm("image_in.norm2", f"{i}.norm2")
        m |= _linear("image_in.ff.0", f"{i}.ff.net.0.proj") | _linear("image_in.ff.2", f"{i}.ff.net.2")
        if cfg.pos_embed_seq_len:
            m["image_in.pos_embed"] = [f"{i}.pos_embed"]
    return m


def wan_key_map(cfg: WanConfig) -> KeyMap:
    """Each WanDiT parameter -> the diffusers checkpoint tensor that fills it."""
    m = _embedders(cfg)
    for k in range(cfg.num_layers):
        o, t = f"layers.{k}", f"blocks.{k}"
        m |= _attention(f"{o}.attn1", f"{t}.attn1", False)
        m |= _attention(f"{o}.attn2", f"{t}.attn2", cfg.added_kv_proj_dim is not None)
        if cfg.cross_attn_norm:
            m |= _norm(f"{o}.norm2", f"{t}.norm2")
        m |= _linear(f"{o}.ffn.0", f"{t}.ffn.net.0.proj") | _linear(f"{o}.ffn.2", f"{t}.ffn.net.2")
        m[f"{o}.scale_shift_table"] = [f"{t}.scale_shift_table"]
    m["head_out.scale_shift_table"] = ["scale_shift_table"]
    m |= _linear("head_out.proj_out", "proj_out")
    return m


def load_wan_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> WanDiT:
    """Build WanDiT on the meta device and fill it from a diffusers `transformer/` (or
    `transformer_2/`) folder, single-file or sharded. Tensors diffusers keeps in float32 (see
    KEEP_FLOAT32) are read into float32 straight from the checkpoint, the rest into `dtype`."""
    folder = Path(folder)
    cfg = WanConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = WanDiT(cfg)
    load_into(model, folder, wan_key_map(cfg), device, dtype,
              dtype_for=lambda key: torch.float32 if keeps_float32(key) else None,
              ignore=lambda key: IGNORED.search(key) is not None)
    log.debug("loaded Wan DiT (%d layers) from %s", cfg.num_layers, folder)
    return model.eval()
