"""Wan transformer configuration, read from a diffusers `transformer/config.json`
(`WanTransformer3DModel`: Wan 2.1 T2V/I2V, Wan 2.2 A14B experts and TI2V-5B)."""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig


@dataclass(frozen=True)
class WanConfig(HeadsConfig, DiffusersConfig):
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None  # Wan 2.1 I2V: CLIP image tokens join the cross-attention
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # first-last-frame models: learned positions of the image tokens

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head-dim split of the rotary table over (frame, row, column), as Wan divides it."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    @classmethod
    def from_dict(cls, raw: dict) -> "WanConfig":
        if raw.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
            raise ValueError(f"Wan transformer with qk_norm={raw['qk_norm']!r} is not supported")
        cfg = cls(**cls.known_fields(raw))
        if len(cfg.patch_size) != 3:
            raise ValueError(f"Wan patch_size must have 3 entries, got {cfg.patch_size}")
        if (cfg.image_dim is None) != (cfg.added_kv_proj_dim is None):
            raise ValueError("Wan transformer: image_dim and added_kv_proj_dim must be given together")
        return cfg
