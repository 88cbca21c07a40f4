"""diffusers' AutoencoderKLWan, the causal video VAE of Wan (2.1: 16 latent channels, 8x spatial;
2.2 TI2V-5B: 48 channels, 16x spatial through a 2x2 pixel patch; both 4x temporal, frames 4k+1 ->
k+1): load, report its compression, encode frames to normalised latents, decode normalised latents
to uint8 frames, whole or in spatial tiles.

Normalisation uses the config's `latents_mean` / `latents_std` in the pipelines' own arithmetic
(they multiply by the reciprocal of std), so results match diffusers bit for bit on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditserve.vae.kl import to_uint8


def load_wan_vae(folder: Path, device, dtype: torch.dtype):
    """The `vae/` folder of a Wan checkpoint (diffusers recommends float32 for it)."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class VideoLatentShape:
    """How the VAE compresses video: `channels` latent channels, frames 1 + 4k -> 1 + k
    (`temporal`), each side / `spatial`."""

    channels: int
    temporal: int
    spatial: int

    @classmethod
    def from_config(cls, cfg: dict) -> VideoLatentShape:
        """From an AutoencoderKLWan config (its defaults: z_dim 16, 4x temporal, 8x spatial)."""
        return cls(cfg.get("z_dim", 16), cfg.get("scale_factor_temporal") or 4, cfg.get("scale_factor_spatial") or 8)

    @classmethod
    def of(cls, vae) -> VideoLatentShape:
        return cls.from_config(dict(vae.config))

    @classmethod
    def read(cls, vae_folder: Path) -> VideoLatentShape:
        """Without loading weights: from `vae/config.json`."""
        return cls.from_config(json.loads((Path(vae_folder) / "config.json").read_text()))

    def latents(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) of the latents of a `num_frames` x height x width video."""
        return self.channels, (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial

    def num_frames(self, latent_frames: int) -> int:
        """Video frames decoded from `latent_frames` latent frames."""
        return (latent_frames - 1) * self.temporal + 1


@dataclass(frozen=True)
class Tiles:
    """Spatial tiling, in pixels: tiles of `height` x `width` every `stride_*` (overlaps are
    blended). The defaults are diffusers' (256 px tiles every 192 px)."""

    height: int = 256
    width: int = 256
    stride_height: int = 192
    stride_width: int = 192


_TILE_ATTRS = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height",
               "tile_sample_stride_width")


@contextmanager
def _tiling(vae, tiles: Tiles | None) -> Iterator[None]:
    """Tiling on with `tiles` (off with None) for the duration; the VAE's own settings come back after."""
    saved = (vae.use_tiling, *(getattr(vae, a) for a in _TILE_ATTRS))
    if tiles is None:
        vae.disable_tiling()
    else:
        vae.enable_tiling(tiles.height, tiles.width, tiles.stride_height, tiles.stride_width)
    try:
        yield
    finally:
        vae.use_tiling = saved[0]
        for attr, value in zip(_TILE_ATTRS, saved[1:]):
            setattr(vae, attr, value)


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


@torch.no_grad()
def encode_wan(vae, video_BCFHW: torch.Tensor, dtype: torch.dtype = torch.float32, tiled: bool = False,
               tiles: Tiles = Tiles()) -> torch.Tensor:
    """Pixels in [-1, 1] [B, 3, F, H, W] -> normalised latents [B, C, f, h, w] in `dtype`: the
    posterior mode (no sampling), `(z - mean) / std`; encoded in the VAE's dtype."""
    with _tiling(vae, tiles if tiled else None):
        latents = vae.encode(video_BCFHW.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    latents = latents.to(dtype)
    mean, inv_std = _stats(vae, latents)
    return (latents - mean) * inv_std


@torch.no_grad()
def decode_wan(vae, latents: torch.Tensor, tiled: bool = False, tiles: Tiles = Tiles()) -> np.ndarray:
    """Normalised latents [B, C, f, h, w] -> uint8 frames [B, F, H, W, 3] (F = 4(f-1)+1), rounded as
    diffusers' `output_type="np"` frames times 255. `tiled` decodes in overlapping spatial `tiles`
    (less memory for large frames; not bit-equal to the whole decode)."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    mean, inv_std = _stats(vae, latents)
    with _tiling(vae, tiles if tiled else None):
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W]
    b, _, f = video.shape[:3]
    frames = to_uint8(video.transpose(1, 2).flatten(0, 1))  # [B*F, H, W, 3]
    return frames.reshape(b, f, *frames.shape[1:])
