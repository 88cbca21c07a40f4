"""Stable Diffusion 3 / 3.5 MMDiT configuration, read from a diffusers `transformer/config.json`
(SD3Transformer2DModel). Every key the SD3-Medium, SD3.5-Medium, SD3.5-Large and Large-Turbo
checkpoints carry is read; values that change the math and that we do not implement are refused."""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig

QK_NORMS = (None, "rms_norm")  # SD3-Medium: none; SD3.5: per-head RMSNorm


@dataclass(frozen=True)
class SD3Config(HeadsConfig, DiffusersConfig):
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5-Medium (MMDiT-X): (0, ..., 12)
    qk_norm: str | None = None

    @property
    def out_dim(self) -> int:
        """Channels of one output patch: patch_size² x latent channels."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @property
    def max_latent_size(self) -> int:
        """The largest latent side the learned position table covers."""
        return self.pos_embed_max_size * self.patch_size

    @classmethod
    def from_dict(cls, raw: dict) -> SD3Config:
        cfg = cls(**cls.known_fields(raw))
        if cfg.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3 transformer with qk_norm={cfg.qk_norm!r} is not supported "
                             f"(supported: none, 'rms_norm')")
        if cfg.caption_projection_dim != cfg.hidden_size:
            raise ValueError(f"SD3 transformer caption_projection_dim {cfg.caption_projection_dim} must equal "
                             f"heads x head dim {cfg.hidden_size}")
        if not cfg.pos_embed_max_size:
            raise ValueError("SD3 transformer without pos_embed_max_size is not supported")
        bad = [i for i in cfg.dual_attention_layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are outside the {cfg.num_layers} layers")
        return cfg
