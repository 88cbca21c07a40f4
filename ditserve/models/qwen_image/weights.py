"""diffusers QwenImageTransformer2DModel keys -> our QwenImageDiT keys."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.common.loading import KeyMap, load_into
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT


def _linear(ours: str, *theirs: str) -> KeyMap:
    return {
        f"{ours}.weight": [f"{t}.weight" for t in theirs],
        f"{ours}.bias": [f"{t}.bias" for t in theirs],
    }


def _block(o: str, t: str) -> KeyMap:
    m: KeyMap = {}
    m |= _linear(f"{o}.img_mod.lin", f"{t}.img_mod.1")
    m |= _linear(f"{o}.txt_mod.lin", f"{t}.txt_mod.1")
    m |= _linear(f"{o}.img_attn.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
    m |= _linear(f"{o}.txt_attn.qkv", f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")
    m |= _linear(f"{o}.img_attn.proj", f"{t}.attn.to_out.0")
    m |= _linear(f"{o}.txt_attn.proj", f"{t}.attn.to_add_out")
    m[f"{o}.img_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_q.weight"]
    m[f"{o}.img_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_k.weight"]
    m[f"{o}.txt_attn.norm.q_norm.weight"] = [f"{t}.attn.norm_added_q.weight"]
    m[f"{o}.txt_attn.norm.k_norm.weight"] = [f"{t}.attn.norm_added_k.weight"]
    m |= _linear(f"{o}.img_mlp.0", f"{t}.img_mlp.net.0.proj")
    m |= _linear(f"{o}.img_mlp.2", f"{t}.img_mlp.net.2")
    m |= _linear(f"{o}.txt_mlp.0", f"{t}.txt_mlp.net.0.proj")
    m |= _linear(f"{o}.txt_mlp.2", f"{t}.txt_mlp.net.2")
    return m


def qwen_image_key_map(cfg: QwenImageConfig) -> KeyMap:
    m: KeyMap = {}
    m |= _linear("img_in", "img_in")
    m |= _linear("txt_in", "txt_in")
    m["txt_norm.weight"] = ["txt_norm.weight"]
    m |= _linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    m |= _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    for i in range(cfg.num_layers):
        m |= _block(f"double_blocks.{i}", f"transformer_blocks.{i}")
    m |= _linear("final_layer.adaLN_modulation", "norm_out.linear")
    m |= _linear("final_layer.linear", "proj_out")
    return m


def load_qwen_image_dit(folder: str | Path, device: torch.device | str, dtype: torch.dtype) -> QwenImageDiT:
    """Build QwenImageDiT on the meta device and fill it from a diffusers `transformer/` folder."""
    folder = Path(folder)
    cfg = QwenImageConfig.from_json(folder / "config.json")
    with torch.device("meta"):
        model = QwenImageDiT(cfg)
    load_into(model, folder, qwen_image_key_map(cfg), device, dtype)
    return model.eval()
