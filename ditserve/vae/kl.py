"""diffusers' AutoencoderKL: load, and decode normalised latents to uint8 pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_autoencoder_kl(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def to_uint8(image_BCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> uint8 [B, H, W, C], rounding as diffusers' image processor does."""
    image = (image_BCHW / 2 + 0.5).clamp(0, 1)
    array = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (array * 255).round().astype("uint8")


@torch.no_grad()
def decode_kl(vae, latents_BCHW: torch.Tensor) -> np.ndarray:
    """Undo the latent normalisation (scaling, shift), decode, and convert to uint8."""
    cfg = vae.config
    latents = latents_BCHW / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return to_uint8(image)
