"""Qwen-Image transformer configuration, read from a diffusers `transformer/config.json`."""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig

# Variants of QwenImageTransformer2DModel that change the math; refused rather than run wrongly.
_UNSUPPORTED = {
    "guidance_embeds": "guidance-distilled Qwen-Image",
    "zero_cond_t": "zero_cond_t (Qwen-Image-Edit-2511)",
    "use_additional_t_cond": "use_additional_t_cond",
    "use_layer3d_rope": "layered 3D RoPE (Qwen-Image-Layered)",
}


@dataclass(frozen=True)
class QwenImageConfig(HeadsConfig, DiffusersConfig):
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    mlp_ratio: float = 4.0
    theta: float = 10000.0

    @property
    def out_dim(self) -> int:
        """Channels of one packed output patch: patch_size² x latent channels."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, raw: dict) -> "QwenImageConfig":
        used = [name for name, what in _UNSUPPORTED.items() if raw.get(name)]
        if used:
            raise ValueError(f"Qwen-Image transformer with {_UNSUPPORTED[used[0]]} is not supported")
        cfg = cls(**cls.known_fields(raw))
        if len(cfg.axes_dims_rope) != 3 or sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must be 3 axes summing to the head dim "
                             f"{cfg.attention_head_dim}")
        return cfg
