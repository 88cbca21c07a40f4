"""--vae-tiling / --vae-slicing (vae/memory.py): a tiled decode equals diffusers' tiled decode at the same
tile sizes within 1/255 and, on a trained VAE, stays within a few /255 of the whole decode; slicing
changes nothing but float rounding; `auto` stays off on the CPU; the auto rule on estimates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditserve import Generator
from ditserve.vae.memory import GIB_ESTIMATE_CHECK, decode_bytes, needs_tiling, set_tile_size

PROMPT = "a red fox in the snow"


def _diff(a, b) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def _ours(folder, **memory):
    return Generator.from_pretrained(folder, device="cpu", dtype=torch.float32, memory=memory)


def test_flux_tiled_decode_matches_diffusers(tiny_flux_dev):
    from diffusers import FluxPipeline

    request = dict(height=96, width=80, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()  # the tiny VAE's own tile: 32 px (its sample_size), a quarter overlap
    expected = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(4), output_type="np", **request).images
    expected = (expected * 255).round().astype("uint8")
    tiled = _ours(tiny_flux_dev, vae_tiling="on").generate(PROMPT, seed=4, num_images=2, **request)
    whole = _ours(tiny_flux_dev, vae_tiling="off", vae_slicing=True).generate(PROMPT, seed=4, num_images=2, **request)
    auto = _ours(tiny_flux_dev).generate(PROMPT, seed=4, num_images=2, **request)  # auto: off on the CPU
    assert _diff(tiled.images[0], expected[0]) <= 1
    assert _diff(tiled.images[0], whole.images[0]) > 0  # it did tile
    assert all(_diff(a, b) <= 1 for a, b in zip(whole.images, auto.images))  # slicing: batch-size rounding only


def test_tiles_stay_close_to_the_whole_decode():
    """On a trained VAE (the demo model's, 64-px tiles with a quarter overlap) at 128²: the tiled
    image is on average within 1/255 of the whole one, 99% of its pixels within 8/255 (the seams,
    where the tiles are blended, differ most). The tiny random VAEs above are no guide here: their
    tiles see too little context."""
    images = [np.asarray(_ours(None, vae_tiling=mode).generate(
        "a red circle on the left, blue background", height=128, width=128, seed=0, num_inference_steps=4).images[0])
        for mode in ("on", "off")]
    d = np.abs(images[0].astype(int) - images[1].astype(int))
    assert 0 < d.mean() <= 1 and np.percentile(d, 99) <= 8


def test_wan_tiled_decode_matches_diffusers(tiny_wan):
    import diffusers

    folder = tiny_wan("t2v")
    request = dict(height=64, width=64, num_frames=5, num_inference_steps=2, guidance_scale=1.0)
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    set_tile_size(pipe.vae, 32)
    pipe.vae.enable_tiling()
    frames = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **request).frames[0]
    expected = (frames * 255).round().astype("uint8")
    tiled = _ours(folder, vae_tiling="on", vae_tile_size=32).generate(PROMPT, seed=0, **request).videos[0]
    whole = _ours(folder).generate(PROMPT, seed=0, **request).videos[0]
    assert tiled.shape == expected.shape
    assert _diff(tiled, expected) <= 1
    assert _diff(tiled, whole) > 0  # it did tile (a tiny random VAE's tiles differ much from the whole)


def test_auto_tiles_when_the_whole_decode_would_not_fit(tiny_flux_dev):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_flux_dev / "vae")
    vae.config.block_out_channels = (128, 256, 512, 512)  # FLUX.1's decoder widths
    latents = torch.empty(1, 16, 128, 128, dtype=torch.bfloat16)  # 1024² image
    estimate = decode_bytes(vae.to(torch.bfloat16), latents)
    assert estimate == GIB_ESTIMATE_CHECK
    assert not needs_tiling(estimate, 80 * 2**30) and needs_tiling(estimate, 4 * 2**30)
    assert decode_bytes(vae, torch.empty(4, 16, 128, 128, dtype=torch.bfloat16), slicing=True) == estimate


@pytest.mark.parametrize("size", [32, 64])
def test_tile_sizes_follow_the_vae_class(tiny_flux_dev, tiny_wan, size):
    from diffusers import AutoencoderKL, AutoencoderKLWan

    kl = AutoencoderKL.from_pretrained(tiny_flux_dev / "vae")
    set_tile_size(kl, size)
    assert (kl.tile_sample_min_size, kl.tile_latent_min_size) == (size, size // 8)
    wan = AutoencoderKLWan.from_pretrained(tiny_wan("t2v") / "vae")
    set_tile_size(wan, size)
    assert (wan.tile_sample_min_height, wan.tile_sample_stride_width) == (size, size * 3 // 4)
