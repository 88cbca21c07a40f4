"""diffusers' AutoencoderKLHunyuanVideo: load, report its compression, decode latents to uint8 frames.

Clips longer than 4 latent frames (more than 17 video frames) decode, as in diffusers, in
overlapping time tiles blended at their seams (the VAE's framewise decoding, on by default). On a
GPU, frames larger than 256x256 px also decode in diffusers' spatial tiles (256 px every 192 px,
`vae.enable_tiling()` as diffusers' own example does): a 720p x 129-frame clip decoded whole needs
far more memory than the DiT. On the CPU, decodes are whole, as diffusers' pipeline runs by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditserve.vae.kl import to_uint8


def load_hunyuan_video_vae(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class HunyuanLatentShape:
    """Latent channels, frames 1 + t·k -> 1 + k (`temporal`), sides / `spatial`, `scaling` factor."""

    channels: int
    temporal: int
    spatial: int
    scaling: float

    @classmethod
    def from_config(cls, cfg: dict) -> HunyuanLatentShape:
        return cls(int(cfg.get("latent_channels", 16)), int(cfg.get("temporal_compression_ratio", 4)),
                   int(cfg.get("spatial_compression_ratio", 8)), float(cfg.get("scaling_factor", 0.476986)))

    @classmethod
    def read(cls, vae_folder: Path) -> HunyuanLatentShape:
        """Without loading weights: from `vae/config.json`."""
        return cls.from_config(json.loads((Path(vae_folder) / "config.json").read_text()))

    def latents(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) of the latents of a `num_frames` x height x width video."""
        return self.channels, (num_frames - 1) // self.temporal + 1, height // self.spatial, width // self.spatial


@torch.no_grad()
def decode_hunyuan_video(vae, latents_BCFHW: torch.Tensor, shape: HunyuanLatentShape,
                         tiled: bool = False) -> np.ndarray:
    """Scaled latents [B, C, f, h, w] -> uint8 frames [B, F, H, W, 3]; `tiled`: spatial tiles too."""
    latents = latents_BCFHW.to(device=vae.device, dtype=vae.dtype) / shape.scaling
    saved = vae.use_tiling
    vae.use_tiling = tiled
    try:
        video = vae.decode(latents, return_dict=False)[0]  # [B, 3, F, H, W]
    finally:
        vae.use_tiling = saved
    b, _, f = video.shape[:3]
    frames = to_uint8(video.transpose(1, 2).flatten(0, 1))
    return frames.reshape(b, f, *frames.shape[1:])
