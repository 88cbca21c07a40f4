"""VAE memory: diffusers' tiled and sliced decode, switched per call, and an estimate of what a whole
decode needs, so that `--vae-tiling auto` tiles only where the whole decode would not fit.

Works on the diffusers VAE classes through their own switches (`use_tiling`, `use_slicing`) and tile
settings: AutoencoderKL (`tile_sample_min_size`, overlap 1/4), the causal video VAEs of Wan and
Qwen-Image (`tile_sample_min_*`, stride 3/4 of the tile), CogVideoX's (`tile_sample_min_*`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Bytes a whole decode holds per output pixel, per channel of the decoder's last (full-resolution)
# block and per byte of the dtype. Video: Wan 2.1 at 1280x720x81, bfloat16, 96 channels, peaked at
# 10.4 GiB on an H200 (benchmarks/results/wan_vae_720p_h200.json): about 63 (a causal chunk of 4
# frames, their caches and the up-sampling temporaries); images: the KL decoder's three 128-channel
# resnets at full size and their norms, about 16. Estimates, not measured per model.
ACTIVATIONS_PER_PIXEL_CHANNEL = {"image": 16, "video": 64}
FREE_FRACTION = 0.9  # of the free memory, for what the estimate misses
GIB_ESTIMATE_CHECK = 1024 * 1024 * 128 * 2 * 16  # FLUX.1 at 1024², bfloat16: 4 GiB (tests pin the rule)


def spatial_scale(vae) -> int:
    """Pixels per latent along each side."""
    ratio = getattr(vae, "spatial_compression_ratio", None)
    if ratio:
        return int(ratio)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def set_tile_size(vae, size: int) -> None:
    """Tiles of `size` pixels a side, with the overlap the VAE class uses by default (KL: a quarter
    of the tile; the video VAEs: tiles every 3/4 of a tile)."""
    if hasattr(vae, "tile_sample_stride_height"):
        vae.tile_sample_min_height = vae.tile_sample_min_width = size
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = size * 3 // 4
    elif hasattr(vae, "tile_sample_min_height"):  # CogVideoX: overlap factors, latent tile sizes
        vae.tile_sample_min_height = vae.tile_sample_min_width = size
        vae.tile_latent_min_height = vae.tile_latent_min_width = size // spatial_scale(vae)
    else:
        vae.tile_sample_min_size = size
        vae.tile_latent_min_size = size // spatial_scale(vae)


def decode_bytes(vae, latents: torch.Tensor, slicing: bool = False) -> int:
    """Estimated peak bytes of a whole (untiled) decode of `latents` ([B, C, h, w] or [B, C, f, h, w])."""
    scale = spatial_scale(vae)
    pixels = latents.shape[-2] * latents.shape[-1] * scale * scale
    batch = 1 if slicing else latents.shape[0]
    channels = _full_resolution_channels(vae)
    kind = "video" if latents.dim() == 5 else "image"
    dtype_bytes = torch.finfo(vae.dtype).bits // 8
    return batch * pixels * channels * dtype_bytes * ACTIVATIONS_PER_PIXEL_CHANNEL[kind]


def _full_resolution_channels(vae) -> int:
    cfg = vae.config
    if getattr(cfg, "block_out_channels", None):
        return int(cfg.block_out_channels[0])
    return int(getattr(cfg, "base_dim", 128))


def free_bytes(device: torch.device) -> int:
    """What a new allocation may use: the device's free memory plus what torch's allocator holds
    unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def needs_tiling(estimate: int, free: int) -> bool:
    """`--vae-tiling auto`'s rule: tile when the whole decode's estimate exceeds 90% of the free memory."""
    return estimate > FREE_FRACTION * free


def apply_vae_memory(vae, tiling: str, slicing: bool, tile_size: int | None = None) -> None:
    """Set `vae` to decode with tiling "on", "off" or "auto" (on when the whole decode would not fit
    the free GPU memory; on the CPU as the VAE was set, i.e. off unless its pipeline tiles), and
    with `slicing` (one sample of a batch at a time). `vae.decode` decides per call; the pipeline's
    own decode code is unchanged."""
    if tile_size is not None:
        set_tile_size(vae, tile_size)
    vae.use_slicing = bool(slicing)
    if tiling == "on":
        vae.enable_tiling()  # diffusers' switch; AutoencoderKL's takes no sizes (set above)
    elif tiling == "off":
        vae.disable_tiling()
    if getattr(vae, "_ditserve_decode", None) is None:
        vae._ditserve_decode = vae.decode
    vae.decode = _deciding_decode(vae, vae._ditserve_decode, tiling, slicing)


def _deciding_decode(vae, decode: Callable, tiling: str, slicing: bool) -> Callable:
    def run(z, *args, **kwargs):
        saved = vae.use_tiling
        if tiling == "on":
            vae.use_tiling = True
        elif tiling == "off":
            vae.use_tiling = False
        elif z.is_cuda and not vae.use_tiling:  # auto: a pipeline that tiles on its own keeps doing so
            estimate, free = decode_bytes(vae, z, slicing), free_bytes(z.device)
            vae.use_tiling = needs_tiling(estimate, free)
            if vae.use_tiling:
                log.info("VAE decode needs about %.1f GiB, %.1f GiB free: decoding in tiles", estimate / 2**30,
                         free / 2**30)
        try:
            return decode(z, *args, **kwargs)
        finally:
            vae.use_tiling = saved
    return run
