"""CogVideoX transformer configuration, read strictly from a diffusers `transformer/config.json`
(`CogVideoXTransformer3DModel`: CogVideoX-2B with sin-cos positions, 5B and 5B-I2V with 3D rotary
positions (I2V: plus learned positions), CogVideoX1.5-5B with patches two latent frames deep).

Every `__init__` parameter of diffusers' class is a field here; a key it does not take, or a value our
model cannot reproduce, is refused with one line naming the key, before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditserve.models.common.config import DiffusersConfig, HeadsConfig

# value our model implements -> why only that one
_ONLY = {
    "flip_sin_to_cos": (True, "the time embedding is cosines first in every checkpoint"),
    "activation_fn": ("gelu-approximate", "the feed-forward is tanh-GELU in every checkpoint"),
    "timestep_activation_fn": ("silu", "the time MLP is SiLU in every checkpoint"),
}


@dataclass(frozen=True)
class CogVideoXConfig(HeadsConfig, DiffusersConfig):
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16  # I2V: 16 noisy + 16 image latents
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5 I2V: an "ofs" embedding (fixed value 2) joins the time embedding
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0  # inference: dropout is the identity
    attention_bias: bool = True
    sample_width: int = 90  # latent sides and video frames the checkpoint was trained at: positions are
    sample_height: int = 60  # laid out (2B), cropped (5B) or sliced (1.5) against them
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None  # 1.5: latent frames per patch
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def sincos_positions(self) -> bool:
        """2B: a sin-cos table over [text, video] tokens is added after the patch embedding."""
        return not self.use_rotary_positional_embeddings

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head-dim split of the rotary table over (frame, row, column): 16, 24, 24 for head dim 64."""
        d = self.attention_head_dim
        return d // 4, d // 8 * 3, d // 8 * 3

    @classmethod
    def from_dict(cls, raw: dict) -> CogVideoXConfig:
        """Refuse unknown keys and values we cannot reproduce, one line each; `_`-keys are metadata."""
        for key in sorted(raw):
            if not key.startswith("_") and key not in cls.__dataclass_fields__:
                raise ValueError(f"CogVideoX transformer config: key {key!r} is not supported")
        cfg = cls(**cls.known_fields(raw))
        cfg.check()
        return cfg

    def check(self) -> None:
        for key, (value, why) in _ONLY.items():
            if getattr(self, key) != value:
                raise ValueError(f"CogVideoX transformer config: {key}={getattr(self, key)!r} is not supported "
                                 f"(only {value!r}: {why})")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX transformer config: use_learned_positional_embeddings needs "
                             "use_rotary_positional_embeddings (diffusers refuses it too)")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX transformer config: patch_size_t needs use_rotary_positional_embeddings "
                             "(diffusers' sin-cos table has no temporal patches)")
        if self.use_rotary_positional_embeddings and sum(self.rope_axes) != self.attention_head_dim:
            raise ValueError(f"CogVideoX transformer config: attention_head_dim={self.attention_head_dim} must be "
                             "a multiple of 8 with rotary positions")
        if self.ofs_embed_dim and self.ofs_embed_dim != self.time_embed_dim:
            raise ValueError(f"CogVideoX transformer config: ofs_embed_dim={self.ofs_embed_dim} must equal "
                             f"time_embed_dim={self.time_embed_dim} (the two embeddings are summed)")
        if self.sincos_positions and self.hidden_size % 16:
            raise ValueError(f"CogVideoX transformer config: the model width {self.hidden_size} must be a multiple "
                             "of 16 for sin-cos positions")
