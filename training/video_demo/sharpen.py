"""Stage 3 (optional): fine-tune the decoder of an exported pipeline's VAE, the encoder frozen.

The VAE learns to decode *sampled* latents, so it blurs a little, and on 14-20 px shapes a little is
enough to round a triangle's corners into a blob (on the first shipped VAE the held-out clips'
reconstructions kept the shape in 65% of frames: circles 100%, squares 60%, triangles 15%). The DiT
learned the encoder's posterior means, so a decoder fine-tuned on exactly those, with the encoder
(and so the latent space, ``latents_mean`` and ``latents_std``) untouched, serves the same DiT and
needs no retraining. Each step renders fresh 17-frame clips of the training combos.

    python -m training.video_demo sharpen --model-path ditserve/demo/video_model --max-minutes 60
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from ditserve.vae.kl import to_uint8
from training.demo.common import STAGE_DATA, step_rng

from . import config
from .checker import check_clip
from .common import lr_now, make_adamw, set_lr
from .scenes import NUM_FRAMES, render_clips, sample_clip, sample_clips, split_combos
from .vae import background_mask, clips_to_tensor, decode_unclamped
from .widen import widen_decoder

log = logging.getLogger(__name__)

STAGE_SHARPEN = STAGE_DATA + 300  # this stage's per-step randomness


def decoder_parameters(vae: AutoencoderKLWan) -> list[torch.nn.Parameter]:
    return [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]


def edge_weighted_l1(recon: torch.Tensor, x: torch.Tensor, fg_weight: float, edge_weight: float) -> torch.Tensor:
    """L1 (no MSE term: L1's best guess at an edge is the edge, not a blend), with the shape's pixels
    weighted ``1 + fg_weight`` and a 3-pixel band along its outline ``edge_weight`` more: the corners
    the evaluator reads the shape from are a handful of pixels in that band."""
    mask = background_mask(x)
    grow = F.max_pool3d(mask, (1, 3, 3), 1, (0, 1, 1))
    shrink = -F.max_pool3d(-mask, (1, 3, 3), 1, (0, 1, 1))
    weight = 1.0 + fg_weight * mask + edge_weight * (grow - shrink)
    return ((recon - x).abs() * weight).mean() / weight.mean()


@torch.no_grad()
def reconstruction_shape_accuracy(vae: AutoencoderKLWan, clips, batch: int = 8) -> float:
    """Fraction of frames whose reconstruction (posterior mean in, decoder out) shows the clip's
    shape, as the evaluator reads it: the ceiling the VAE puts on the demo's shape accuracy."""
    right = []
    for i in range(0, len(clips), batch):
        part = clips[i:i + batch]
        x = clips_to_tensor(render_clips(part, NUM_FRAMES, vae.device))
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        frames = to_uint8(y.transpose(1, 2).flatten(0, 1)).reshape(len(part), NUM_FRAMES, *x.shape[-2:], 3)
        right += [check_clip(f, c.combo)["shape"] for f, c in zip(frames, part)]
    return float(np.mean(right))


def sharpen_decoder(model_path: Path, seed: int, steps: int, batch_size: int = 4, lr: float = 1e-4,
                    fg_weight: float = 10.0, edge_weight: float = 20.0, deadline: float | None = None,
                    check_every: int = 100, num_check: int = 48, widen: bool = False,
                    device: torch.device | None = None) -> dict:
    """Fine-tune ``model_path``/vae's decoder for ``steps`` steps (or until ``deadline``, a
    ``time.monotonic()`` value) and save it back in place; returns the reconstruction shape accuracy
    on ``num_check`` held-out clips before and after. ``widen`` first doubles the decoder's channels
    (``widen.widen_decoder``: the same pixels to start from, twice the width to learn with)."""
    folder = model_path / "vae"
    device = device or torch.device("cpu")
    vae = AutoencoderKLWan.from_pretrained(folder).float()
    vae = (widen_decoder(vae, seed) if widen else vae).to(device)
    train_combos, held = split_combos(seed, config.NUM_HELD_OUT)
    check_clips = sample_clips(seed + 1, num_check, held)
    vae.eval().requires_grad_(False)
    params = decoder_parameters(vae)
    before = reconstruction_shape_accuracy(vae, check_clips)
    log.info("decoder fine-tune: %d steps at batch %d, decoder width %d; reconstructions show the shape in "
             "%.1f%% of frames", steps, batch_size, vae.config.decoder_base_dim or vae.config.base_dim, 100 * before)
    for p in params:
        p.requires_grad_(True)
    opt = make_adamw(params, lr, device)
    started, clock, step = time.monotonic(), time.perf_counter(), 0
    for step in range(steps):
        set_lr(opt, lr_now(step, lr, min(50, steps // 10), steps, started, deadline))
        rng = step_rng(seed, STAGE_SHARPEN, step)
        x = clips_to_tensor(render_clips([sample_clip(rng, train_combos, NUM_FRAMES) for _ in range(batch_size)],
                                             NUM_FRAMES, device))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = edge_weighted_l1(decode_unclamped(vae, z), x, fg_weight, edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % check_every == 0:
            log.info("sharpen step %d/%d  rec %.4f  %.2f step/s  shape %.1f%%", step + 1, steps, loss.item(),
                     (step + 1) / (time.perf_counter() - clock), 100 * reconstruction_shape_accuracy(vae, check_clips))
        if deadline is not None and time.monotonic() > deadline:
            log.warning("sharpen: out of time after step %d of %d", step + 1, steps)
            break
    vae.requires_grad_(False)
    after = reconstruction_shape_accuracy(vae, check_clips)
    vae.cpu().save_pretrained(folder, safe_serialization=True)
    for path in folder.iterdir():
        path.chmod(0o644)
    log.info("decoder saved to %s: shape kept in %.1f%% -> %.1f%% of frames", folder, 100 * before, 100 * after)
    return {"steps": step + 1, "shape_before": before, "shape_after": after}
