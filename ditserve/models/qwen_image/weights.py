"""diffusers QwenImageTransformer2DModel keys -> our QwenImageDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, double_block_keys, load_dit
from ditserve.models.common.loading import linear_keys as _linear
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT


def qwen_image_key_map(cfg: QwenImageConfig) -> KeyMap:
    m: KeyMap = {}
    m |= _linear("img_in", "img_in")
    m |= _linear("txt_in", "txt_in")
    m["txt_norm.weight"] = ["txt_norm.weight"]
    m |= _linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    m |= _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    if cfg.use_additional_t_cond:
        m["t_cond_in.weight"] = ["time_text_embed.addition_t_embedding.weight"]
    for i in range(cfg.num_layers):
        m |= double_block_keys(f"double_blocks.{i}", f"transformer_blocks.{i}", img_mod="img_mod.1",
                               txt_mod="txt_mod.1", img_mlp="img_mlp", txt_mlp="txt_mlp")
    m |= _linear("final_layer.adaLN_modulation", "norm_out.linear")
    m |= _linear("final_layer.linear", "proj_out")
    return m


def load_qwen_image_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> QwenImageDiT:
    """Build QwenImageDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    return load_dit(folder, QwenImageConfig, QwenImageDiT, qwen_image_key_map, device, dtype)
