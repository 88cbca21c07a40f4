"""Wan transformer configuration, read strictly from a diffusers `transformer/config.json`
(`WanTransformer3DModel`: Wan 2.1 T2V/I2V/FLF2V, Wan 2.2 A14B experts and TI2V-5B).

Every key diffusers' class takes is honoured; a key it does not take, or a value our model cannot
reproduce, is refused with one line naming the key (before any weight is read).
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig

QK_NORM = "rms_norm_across_heads"


@dataclass(frozen=True)
class WanConfig(HeadsConfig, DiffusersConfig):
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) of latents per token
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16  # 2.1/2.2 I2V: 16 noisy + 4 mask + 16 condition = 36
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = QK_NORM
    eps: float = 1e-6
    image_dim: int | None = None  # Wan 2.1 I2V: CLIP image tokens join the cross-attention
    added_kv_proj_dim: int | None = None  # their key/value projections' input width (= model width)
    rope_max_seq_len: int = 1024  # longest (frames, rows, columns) side of the token grid
    pos_embed_seq_len: int | None = None  # FLF2V: learned positions of first + last frame's image tokens

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head-dim split of the rotary table over (frame, row, column): rows and columns get
        2·(head_dim // 6) each, frames the rest (44, 42, 42 for head dim 128)."""
        h = w = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - h - w, h, w

    @classmethod
    def from_dict(cls, raw: dict) -> WanConfig:
        """Refuse unknown keys and values we cannot reproduce, one line each; `_`-keys are metadata."""
        for key in sorted(raw):
            if not key.startswith("_") and key not in cls.__dataclass_fields__:
                raise ValueError(f"Wan transformer config: key {key!r} is not supported")
        cfg = cls(**cls.known_fields(raw))
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.qk_norm != QK_NORM:
            raise ValueError(f"Wan transformer config: qk_norm={self.qk_norm!r} is not supported (only {QK_NORM!r})")
        if len(self.patch_size) != 3:
            raise ValueError(f"Wan transformer config: patch_size must have 3 entries, got {list(self.patch_size)}")
        if self.attention_head_dim % 2:
            raise ValueError(f"Wan transformer config: attention_head_dim={self.attention_head_dim} must be even")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("Wan transformer config: image_dim and added_kv_proj_dim must be given together, got "
                             f"image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.hidden_size:
            # image tokens reach those projections at the model width
            raise ValueError(f"Wan transformer config: added_kv_proj_dim={self.added_kv_proj_dim} must equal "
                             f"num_attention_heads * attention_head_dim = {self.hidden_size}")
