"""Video decoding split across the ranks: the latent video is cut into overlapping spatial tiles (the
tiling diffusers' Wan VAE uses), each rank decodes every world-th tile through all frames, the tiles
are exchanged and blended on every rank. The result equals one process's tiled decode (not the
untiled one: tiles see no context past their overlap), so it is opt-in (`--vae-parallel`).

Tiles are spatial only: the Wan VAE is causal in time with a per-frame cache, so splitting frames
would change every frame after a cut.

The per-tile decode drives the VAE's own modules frame by frame exactly as diffusers' tiled decode
does (`post_quant_conv`, `decoder` with its feature cache; diffusers 0.42's AutoencoderKLWan).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ditserve.parallel.groups import Axis, ParallelGroups
from ditserve.vae.wan import Tiles

log = logging.getLogger(__name__)


def _decode_tile(vae, z: torch.Tensor) -> torch.Tensor:
    """One latent tile [B, C, f, h, w] through all frames, causally, before unpatchify and clamp."""
    vae.clear_cache()
    frames = []
    for k in range(z.shape[2]):
        vae._conv_idx = [0]
        x = vae.post_quant_conv(z[:, :, k:k + 1])
        frames.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def _ramp(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device, dtype=torch.float64).div(n).to(like.dtype)


def _blend(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows (dim -2) or columns (dim -1) of `tile` from the last ones of
    `prev`, linearly."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent <= 0:
        return tile
    w = _ramp(extent, tile).view(-1, 1) if dim == -2 else _ramp(extent, tile)
    head = tile.narrow(dim, 0, extent)
    mixed = prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + head * w
    return torch.cat([mixed, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def _share(tile: torch.Tensor | None, owner: int, axis: Axis, like: torch.Tensor) -> torch.Tensor:
    """The tile decoded by rank `owner`, on every rank (its shape goes first)."""
    shape = torch.zeros(5, dtype=torch.int64, device=like.device)
    if axis.rank == owner:
        shape.copy_(torch.tensor(tile.shape))
    dist.broadcast(shape, src=axis.global_rank(owner), group=axis.group)
    buf = tile.contiguous() if axis.rank == owner else like.new_empty(tuple(shape.tolist()))
    dist.broadcast(buf, src=axis.global_rank(owner), group=axis.group)
    return buf


@torch.no_grad()
def parallel_tiled_decode(vae, z: torch.Tensor, axis: Axis, tiles: Tiles = Tiles()) -> torch.Tensor:
    """Latents (already denormalised) [B, C, f, h, w] -> video [B, 3, F, H, W] in [-1, 1], tile t
    decoded by rank t mod size."""
    ratio, patch = vae.spatial_compression_ratio, vae.config.patch_size or 1
    min_h, min_w = tiles.height // ratio, tiles.width // ratio
    step_h, step_w = tiles.stride_height // ratio, tiles.stride_width // ratio
    out_step_h, out_step_w = tiles.stride_height // patch, tiles.stride_width // patch
    blend_h, blend_w = tiles.height // patch - out_step_h, tiles.width // patch - out_step_w
    _, _, _, height, width = z.shape
    starts = [(i, j) for i in range(0, height, step_h) for j in range(0, width, step_w)]
    like = torch.empty(0, device=z.device, dtype=z.dtype)
    decoded = {}
    for t, (i, j) in enumerate(starts):
        mine = _decode_tile(vae, z[:, :, :, i:i + min_h, j:j + min_w]) if t % axis.size == axis.rank else None
        decoded[(i, j)] = _share(mine, t % axis.size, axis, like) if axis.size > 1 else mine
    rows = []
    for i in range(0, height, step_h):
        row = []
        for j in range(0, width, step_w):
            tile = decoded[(i, j)]
            if i > 0:
                tile = _blend(decoded[(i - step_h, j)], tile, blend_h, -2)
            if j > 0:
                tile = _blend(decoded[(i, j - step_w)], tile, blend_w, -1)
            decoded[(i, j)] = tile  # later tiles blend with this one as blended (as diffusers' in-place blend)
            row.append(tile[..., :out_step_h, :out_step_w])
        rows.append(torch.cat(row, dim=-1))
    video = torch.cat(rows, dim=-2)[..., : height * ratio // patch, : width * ratio // patch]
    if vae.config.patch_size is not None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        video = unpatchify(video, patch_size=vae.config.patch_size)
    return video.clamp(-1.0, 1.0)


class ParallelDecode:
    """Set as a Wan VAE's `decode`: every call decodes in parallel tiles (whatever its tiling flag)."""

    def __init__(self, vae, axis: Axis, tiles: Tiles):
        self.vae, self.axis, self.tiles = vae, axis, tiles

    def __call__(self, z: torch.Tensor, return_dict: bool = True):
        video = parallel_tiled_decode(self.vae, z, self.axis, self.tiles)
        if return_dict:
            from diffusers.models.autoencoders.vae import DecoderOutput

            return DecoderOutput(sample=video)
        return (video,)


def apply_parallel_decode(pipeline, groups: ParallelGroups, tiles: Tiles = Tiles()) -> None:
    """Make the pipeline's video VAE decode across all ranks of the replica (image VAEs: unchanged)."""
    vae = getattr(pipeline, "vae", None)
    if vae is None or type(vae).__name__ != "AutoencoderKLWan":
        log.info("parallel VAE decode applies to video VAEs only; %s decodes on each rank",
                 type(vae).__name__ if vae is not None else "nothing")
        return
    axis = Axis(None, groups.rank, groups.world, tuple(range(groups.world)))
    vae.decode = ParallelDecode(vae, axis, tiles)
    log.info("video VAE decode split over %d ranks in %dx%d tiles", groups.world, tiles.height, tiles.width)
