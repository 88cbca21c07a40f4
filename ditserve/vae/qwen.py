"""diffusers' AutoencoderKLQwenImage (a causal 3D VAE run on single frames): load, encode input
images to normalised latents, decode normalised latents to uint8 pixels.

Latents are normalised per channel with the config's `latents_mean` / `latents_std`, in the
same arithmetic as the diffusers pipelines, so encode and decode match theirs bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditserve.vae.kl import to_uint8


def load_qwen_vae(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def spatial_scale(vae) -> int:
    """Pixels per latent along each side (8 for Qwen-Image)."""
    return 2 ** len(vae.config.temperal_downsample)


def _stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def encode_qwen(vae, images_BCHW: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> normalised latents [B, z, h, w] (the posterior mode)."""
    x = images_BCHW.to(device=vae.device, dtype=vae.dtype)[:, :, None]
    latents = vae.encode(x).latent_dist.mode()
    mean, std = _stats(vae, latents)
    return ((latents - mean) / std)[:, :, 0]


@torch.no_grad()
def decode_qwen(vae, latents_BCHW: torch.Tensor) -> np.ndarray:
    """Normalised latents [B, z, h, w] -> uint8 images [B, H, W, 3]."""
    latents = latents_BCHW[:, :, None].to(vae.dtype)
    mean, std = _stats(vae, latents)
    latents = latents / (1.0 / std) + mean  # diffusers divides by the reciprocal; kept for bit parity
    image = vae.decode(latents, return_dict=False)[0][:, :, 0]
    return to_uint8(image)
