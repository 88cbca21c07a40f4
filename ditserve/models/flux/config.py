"""FLUX.1 transformer configuration, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig


@dataclass(frozen=True)
class FluxConfig(HeadsConfig, DiffusersConfig):
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
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, raw: dict) -> "FluxConfig":
        if raw.get("patch_size", 1) != 1:
            raise ValueError(f"FLUX transformer with patch_size={raw['patch_size']} is not supported")
        cfg = cls(**cls.known_fields(raw))
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to the head dim {cfg.attention_head_dim}")
        return cfg
