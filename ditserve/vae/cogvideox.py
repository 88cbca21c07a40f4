"""diffusers' AutoencoderKLCogVideoX: load, report its compression, encode an image to latents, and
decode latents to uint8 frames.

The VAE decodes two latent frames at a time (its GroupNorm statistics are per such batch, so a
whole-clip decode would differ by up to 38/255); only clips of 8k + 1 frames (an odd number of
latent frames) come back at their own length, which is why the CogVideoX pipelines take only those.
Latents are [B, F, C, h, w] (frames before channels), scaled by the config's `scaling_factor` in the
pipelines' own arithmetic, so results match diffusers bit for bit on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditserve.vae.kl import to_uint8


def load_cogvideox_vae(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLCogVideoX

    vae = AutoencoderKLCogVideoX.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class CogVideoXLatentShape:
    """How the VAE compresses video: frames 1 + t·k -> 1 + k (`temporal`), sides / `spatial`;
    `scaling` the latent scaling factor; `invert` (1.5 I2V VAEs) divides image latents by it."""

    temporal: int
    spatial: int
    scaling: float
    invert: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> CogVideoXLatentShape:
        return cls(int(cfg.get("temporal_compression_ratio", 4)),
                   2 ** (len(cfg.get("block_out_channels", (128, 256, 256, 512))) - 1),
                   float(cfg.get("scaling_factor", 1.15258426)), bool(cfg.get("invert_scale_latents", False)))

    @classmethod
    def read(cls, vae_folder: Path) -> CogVideoXLatentShape:
        """Without loading weights: from `vae/config.json`."""
        return cls.from_config(json.loads((Path(vae_folder) / "config.json").read_text()))

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal + 1


@torch.no_grad()
def decode_cogvideox(vae, latents_BFCHW: torch.Tensor, shape: CogVideoXLatentShape) -> np.ndarray:
    """Scaled latents [B, F, C, h, w] -> uint8 frames [B, 4(F-1)+1, H, W, 3]."""
    latents = latents_BFCHW.to(device=vae.device, dtype=vae.dtype).permute(0, 2, 1, 3, 4)
    video = vae.decode((1 / shape.scaling) * latents).sample  # [B, 3, F, H, W]
    b, _, f = video.shape[:3]
    frames = to_uint8(video.transpose(1, 2).flatten(0, 1))
    return frames.reshape(b, f, *frames.shape[1:])


@torch.no_grad()
def encode_cogvideox_image(vae, image_BCHW: torch.Tensor, shape: CogVideoXLatentShape,
                           generator: torch.Generator) -> torch.Tensor:
    """An image in [-1, 1] [1, 3, H, W] -> scaled latents [1, 1, C, h, w] (float32): a sample of the
    posterior drawn from `generator` (the request's, before its initial noise, as diffusers draws it)."""
    dist = vae.encode(image_BCHW.to(device=vae.device, dtype=vae.dtype)[:, :, None]).latent_dist
    latents = dist.sample(generator).float().permute(0, 2, 1, 3, 4)
    return (1 / shape.scaling) * latents if shape.invert else shape.scaling * latents
