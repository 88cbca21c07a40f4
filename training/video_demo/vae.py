"""Stage 1: the video autoencoder (diffusers ``AutoencoderKLWan``), trained on freshly drawn clips.

Every step draws its own clips (short ones: the VAE is causal and chunked, so what it learns on
9 frames holds for 17) and renders them on the training device. Loss: L1 + MSE reconstruction of
the posterior sample plus a very small KL term. Afterwards the recipe's clip set (17 frames) is
encoded once for stage 2, and the latents' per-channel mean and spread become the VAE's
``latents_mean`` and ``latents_std`` (as Wan's: the pipeline decodes ``x * std + mean``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from training.demo.common import (
    STAGE_DATA,
    STAGE_VAE,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
    step_generator,
    step_rng,
)

from . import config
from .common import autocast, lr_now
from .scenes import NUM_FRAMES, Combo, render_clips, sample_clip

log = logging.getLogger(__name__)


def build_vae(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    z = config.LATENT_CHANNELS
    return AutoencoderKLWan(**config.VAE, latents_mean=[0.0] * z, latents_std=[1.0] * z)


def clips_to_tensor(clips: torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, H, W] in [-1, 1], as diffusers' video VAEs expect."""
    return clips.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def train_vae(work: Path, recipe: config.Recipe, combos: list[Combo], device: torch.device,
              deadline: float | None = None, stop_after: int | None = None) -> tuple[AutoencoderKLWan, int]:
    """Train (or resume, or just load) the VAE checkpointed at ``work/vae.ckpt``; returns it with the
    number of steps it has had. Stops (checkpointed) after step ``stop_after`` or past ``deadline``
    (a ``time.monotonic()`` value); the same command without them resumes."""
    cfg = recipe.vae
    model = build_vae(recipe.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt_path, start = work / "vae.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    log.info("VAE: %.2f M parameters, steps %d -> %d on %s (batch %d x %d frames)", count_parameters(model) / 1e6,
             start, cfg.steps, device, cfg.batch_size, cfg.frames)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    model.train()
    clock, started, seen, step = time.perf_counter(), time.monotonic(), 0, start - 1
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_now(step, cfg.lr, cfg.warmup, cfg.steps, started, deadline)
        rng = step_rng(recipe.seed, STAGE_VAE, step)
        clips = [sample_clip(rng, combos, cfg.frames) for _ in range(cfg.batch_size)]
        x = clips_to_tensor(render_clips(clips, cfg.frames, device))
        with autocast(recipe, device):
            posterior = model.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=step_generator(recipe.seed, STAGE_VAE, step))
            recon = model.decode(posterior.mean + posterior.std * noise.to(device)).sample.float()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += 1
        if (step + 1) % cfg.log_every == 0:
            rate = seen / (time.perf_counter() - clock)
            log.info("vae step %d/%d  rec %.4f  kl %.1f  lr %.2e  %.2f step/s", step + 1, cfg.steps, rec.item(),
                     kl.item(), opt.param_groups[0]["lr"], rate)
        out_of_time = deadline is not None and time.monotonic() > deadline
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end or out_of_time:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        if out_of_time:
            log.warning("VAE: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return model.eval().requires_grad_(False), step + 1


@torch.no_grad()
def encode_dataset(work: Path, recipe: config.Recipe, vae: AutoencoderKLWan, vae_steps: int, combos: list[Combo],
                   device: torch.device, deadline: float | None = None) -> dict:
    """Draw the recipe's ``dataset_size`` clips of 17 frames and encode them once (posterior means);
    cached at ``work/latents.pt`` for this VAE step. Past ``deadline`` (``time.monotonic()``) it
    stops early and keeps the clips encoded so far (at least one chunk).

    Returns {"latents": float16 [N, C, 5, 8, 8] raw latents, "combo": int64 [N] indices into
    ``combos``, "mean", "std": per-channel lists, "key"}: (z - mean) / std is what the DiT learns.
    """
    path = work / "latents.pt"
    key = {"seed": recipe.seed, "dataset_size": recipe.dataset_size, "vae_steps": vae_steps}
    if path.is_file():
        data = torch.load(path, map_location="cpu")
        if data.get("key") == key:
            return data
    start = time.perf_counter()
    rng = step_rng(recipe.seed, STAGE_DATA, 0)
    clips = [sample_clip(rng, combos, NUM_FRAMES) for _ in range(recipe.dataset_size)]
    index = {c: i for i, c in enumerate(combos)}
    chunks, size = [], 256 if device.type == "cuda" else 8
    for first in range(0, len(clips), size):
        x = clips_to_tensor(render_clips(clips[first:first + size], NUM_FRAMES, device))
        with autocast(recipe, device):
            chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
        if deadline is not None and time.monotonic() > deadline and first + size < len(clips):
            log.warning("encoding: out of time after %d of %d clips; the DiT learns those", first + size, len(clips))
            clips = clips[:first + size]
            break
    latents = torch.cat(chunks)
    per_channel = latents.transpose(0, 1).flatten(1)
    data = {"latents": latents.half(), "combo": torch.tensor([index[c.combo] for c in clips]),
            "mean": per_channel.mean(1).tolist(), "std": per_channel.std(1).clamp_min(1e-3).tolist(), "key": key}
    torch.save(data, path)
    log.info("encoded %d clips in %.1f s: latent shape %s, mean %.3f, std %.3f (over channels)", len(clips),
             time.perf_counter() - start, tuple(latents.shape[1:]), latents.mean().item(), latents.std().item())
    return data
