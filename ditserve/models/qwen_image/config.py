"""Qwen-Image transformer configuration, read strictly from a diffusers `transformer/config.json`.

Every `__init__` parameter of diffusers' QwenImageTransformer2DModel is listed in `KEYS`: honoured
(a field below) or refused with one line naming the key and value. Keys that are not `__init__`
parameters (e.g. `pooled_projection_dim` in Qwen-Image's own folder) are ignored, as diffusers
ignores them. A unit test checks `KEYS` against the installed diffusers' signature.

The variants, all honoured:
- `zero_cond_t` (Qwen-Image-Edit-2511): two conditioning vectors, timestep t and 0; image tokens of
  the image being generated are modulated by t, input-image tokens by 0 (per-token modulation).
- `use_additional_t_cond` (Qwen-Image-Layered): a learned 2-row embedding added to the timestep
  vector (row 0 for RGB(A) generation, the only one diffusers' pipelines use).
- `use_layer3d_rope` (Qwen-Image-Layered): the last image grid is the input image, on frame -1;
  text starts after the largest grid and after the number of generated layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig

HONOURED = "honoured"
# key -> HONOURED, or (the only accepted value, why another is refused)
KEYS: dict[str, object] = {
    "patch_size": (2, "the pipelines pack 2x2 latent patches"),
    "in_channels": HONOURED, "out_channels": HONOURED, "num_layers": HONOURED,
    "attention_head_dim": HONOURED, "num_attention_heads": HONOURED, "joint_attention_dim": HONOURED,
    "axes_dims_rope": HONOURED, "zero_cond_t": HONOURED, "use_additional_t_cond": HONOURED,
    "use_layer3d_rope": HONOURED,
    # diffusers' own forward cannot run it (its timestep embedding takes no guidance argument)
    "guidance_embeds": (False, "guidance-distilled Qwen-Image does not run in diffusers 0.42.1 either"),
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
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    mlp_ratio: float = 4.0
    theta: float = 10000.0

    @property
    def out_dim(self) -> int:
        """Channels of one packed output patch: patch_size² x latent channels."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, raw: dict) -> "QwenImageConfig":
        for key, rule in KEYS.items():
            if rule != HONOURED and key in raw and raw[key] != rule[0]:
                raise ValueError(f"Qwen-Image transformer config {key}={raw[key]!r} is not supported: {rule[1]}")
        cfg = cls(**{k: v for k, v in cls.known_fields(raw).items() if KEYS.get(k) == HONOURED})
        if len(cfg.axes_dims_rope) != 3 or sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must be 3 axes summing to the head dim "
                             f"{cfg.attention_head_dim}")
        return cfg
