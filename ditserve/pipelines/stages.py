"""Pieces shared by the families' stages: initial noise, latent grids, 2x2 latent packing.

The denoising loop itself is pipelines/denoise.py."""

from __future__ import annotations

import torch

from ditserve.api import GenerationRequest


def initial_noise(requests: list[GenerationRequest], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """Noise drawn as diffusers draws it: one CPU generator per request, seeded with its seed,
    shape (num_images, *shape), in the pipeline dtype; then moved to the device."""
    draws = []
    for req in requests:
        gen = torch.Generator("cpu").manual_seed(req.seed)
        draws.append(torch.randn((req.num_images, *shape), generator=gen, dtype=dtype))
    return torch.cat(draws).to(device)


def latent_grid(height: int, width: int, vae_scale: int, patch: int = 2) -> tuple[int, int]:
    """(rows, cols) of latents for an image, floored to whole `patch`-sized patches (as the
    diffusers pipelines size their latents)."""
    return patch * (height // (vae_scale * patch)), patch * (width // (vae_scale * patch))


def pack(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches, row-major."""
    b, c, h, w = latents_BCHW.shape
    x = latents_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x_BLC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    (b, _, c), (h, w) = x_BLC.shape, grid
    x = x_BLC.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def repeat_per_image(t: torch.Tensor, requests: list[GenerationRequest]) -> torch.Tensor:
    """Per-request rows repeated for each request's images (num_images)."""
    counts = torch.tensor([r.num_images for r in requests], device=t.device)
    return t.repeat_interleave(counts, dim=0)
