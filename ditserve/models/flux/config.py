"""FLUX.1 transformer configuration, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    mlp_ratio: float = 4.0
    theta: float = 10000.0

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, raw: dict) -> "FluxConfig":
        if raw.get("patch_size", 1) != 1:
            raise ValueError(f"FLUX transformer with patch_size={raw['patch_size']} is not supported")
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in raw.items() if k in names}
        if "axes_dims_rope" in kwargs:
            kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
        cfg = cls(**kwargs)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to the head dim {cfg.attention_head_dim}")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "FluxConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
