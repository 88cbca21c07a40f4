"""HunyuanVideo transformer configuration, read strictly from a diffusers `transformer/config.json`
(`HunyuanVideoTransformer3DModel`: HunyuanVideo T2V and the guidance-distilled FastHunyuan folders).

Every key diffusers' class takes is read; a key it does not take, or a value our model cannot
reproduce (the image-to-video variants' `image_condition_type`), is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig


@dataclass(frozen=True)
class HunyuanVideoConfig(HeadsConfig, DiffusersConfig):
    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2  # text token refiner blocks
    mlp_ratio: float = 4.0
    patch_size: int = 2  # rows and columns of latents per token
    patch_size_t: int = 1  # latent frames per token
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096  # the LLaMA encoder's width
    pooled_projection_dim: int = 768  # CLIP-L's pooled width
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)  # (frame, row, column) parts of the head dim
    image_condition_type: str | None = None

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.patch_size_t, self.patch_size, self.patch_size

    @classmethod
    def from_dict(cls, raw: dict) -> HunyuanVideoConfig:
        """Refuse unknown keys and values we cannot reproduce; `_`-keys are metadata."""
        for key in sorted(raw):
            if not key.startswith("_") and key not in cls.__dataclass_fields__:
                raise ValueError(f"HunyuanVideo transformer config: key {key!r} is not supported")
        cfg = cls(**cls.known_fields(raw))
        if cfg.image_condition_type is not None:
            raise ValueError(f"HunyuanVideo transformer config: image_condition_type={cfg.image_condition_type!r} "
                             "(image-to-video) is not supported")
        if cfg.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideo transformer config: qk_norm={cfg.qk_norm!r} is not supported "
                             "(only 'rms_norm')")
        if len(cfg.rope_axes_dim) != 3 or sum(cfg.rope_axes_dim) != cfg.attention_head_dim:
            raise ValueError(f"HunyuanVideo transformer config: rope_axes_dim {list(cfg.rope_axes_dim)} must be 3 "
                             f"even parts summing to the head dim {cfg.attention_head_dim}")
        if any(d % 2 for d in cfg.rope_axes_dim):
            raise ValueError(f"HunyuanVideo transformer config: rope_axes_dim {list(cfg.rope_axes_dim)} must be even")
        return cfg
