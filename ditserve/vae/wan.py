"""diffusers' AutoencoderKLWan (Wan 2.1: 16 latent channels, 8x spatial; Wan 2.2: 48 channels, 16x):
load, encode conditioning frames to normalised latents, decode normalised latents to uint8 frames.

Normalisation uses the config's `latents_mean` / `latents_std` in the pipelines' own arithmetic
(they divide by the reciprocal of std), so results match diffusers bit for bit on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditserve.vae.kl import to_uint8


def load_wan_vae(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class VideoLatentShape:
    """How the VAE compresses video: frames 4k+1 -> k+1 latent frames, sides / spatial."""

    channels: int
    temporal: int
    spatial: int

    @classmethod
    def of(cls, vae) -> "VideoLatentShape":
        cfg = vae.config
        return cls(cfg.z_dim, getattr(cfg, "scale_factor_temporal", 4), getattr(cfg, "scale_factor_spatial", 8))

    def latents(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.channels, (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


@torch.no_grad()
def encode_wan(vae, video_BCFHW: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels in [-1, 1] [B, 3, F, H, W] -> normalised latents (the posterior mode), in `dtype`."""
    latents = vae.encode(video_BCFHW.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    latents = latents.to(dtype)
    mean, inv_std = _stats(vae, latents)
    return (latents - mean) * inv_std


@torch.no_grad()
def decode_wan(vae, latents: torch.Tensor, tiled: bool = False) -> np.ndarray:
    """Normalised latents [B, C, f, h, w] -> uint8 frames [B, F, H, W, 3]; `tiled` decodes in
    overlapping spatial tiles (less memory for large frames; not bit-equal to the whole decode)."""
    if tiled:
        vae.enable_tiling()
    try:
        latents = latents.to(vae.dtype)
        mean, inv_std = _stats(vae, latents)
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]  # [B, 3, F, H, W]
    finally:
        if tiled:
            vae.disable_tiling()
    b, _, f = video.shape[:3]
    frames = to_uint8(video.transpose(1, 2).flatten(0, 1))  # [B*F, H, W, 3]
    return frames.reshape(b, f, *frames.shape[1:])
