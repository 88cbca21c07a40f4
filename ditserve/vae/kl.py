"""diffusers' AutoencoderKL: load, and decode normalised latents to uint8 pixels; the pixel conversions
every VAE shares (PIL image -> [-1, 1] tensor, [-1, 1] tensor -> uint8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_autoencoder_kl(folder: Path, device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def image_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> [1, 3, height, width] in [-1, 1], resized with Lanczos as diffusers' VaeImageProcessor."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


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
