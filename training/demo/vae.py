"""Stage 1: the autoencoder (diffusers ``AutoencoderKL``), trained on freshly drawn scenes.

Loss: L1 + MSE reconstruction of the posterior sample, plus a small KL term that keeps the
latent smooth. After training, the latents of a fixed scene set are encoded once for stage 2,
and their mean and spread become the VAE's ``shift_factor`` and ``scaling_factor`` (as FLUX's).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import config
from .common import (STAGE_DATA, STAGE_VAE, count_parameters, images_to_tensor, load_checkpoint, lr_at,
                     save_checkpoint, step_rng)
from .scenes import Combo, render, render_dataset, sample_scene

log = logging.getLogger(__name__)


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**config.VAE)


def vae_batch(seed: int, step: int, batch_size: int, combos: list[Combo]) -> torch.Tensor:
    rng = step_rng(seed, STAGE_VAE, step)
    return images_to_tensor(np.stack([render(sample_scene(rng, combos)) for _ in range(batch_size)]))


def train_vae(work: Path, recipe: config.Recipe, combos: list[Combo], device: torch.device,
              deadline: float | None = None) -> AutoencoderKL:
    """Train (or resume, or just load) the VAE checkpointed at ``work/vae.ckpt``.

    Past ``deadline`` (a ``time.monotonic()`` value) it checkpoints and stops early.
    """
    cfg = recipe.vae
    model = build_vae(recipe.seed).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ckpt_path = work / "vae.ckpt"
    start = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    log.info("VAE: %.2f M parameters, steps %d -> %d on %s", count_parameters(model) / 1e6, start, cfg.steps,
             device)
    model.train()
    clock, seen = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        x = vae_batch(recipe.seed, step, cfg.batch_size, combos).to(device)
        posterior = model.encode(x).latent_dist
        gen = torch.Generator("cpu").manual_seed(recipe.seed * 1_000_003 + step)
        noise = torch.randn(posterior.mean.shape, generator=gen).to(device)
        z = posterior.mean + posterior.std * noise
        recon = model.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean()
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
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or out_of_time:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1})
        if out_of_time:
            log.warning("VAE: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return model.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(work: Path, recipe: config.Recipe, vae: AutoencoderKL, combos: list[Combo],
                   device: torch.device) -> dict:
    """Encode ``dit.dataset_size`` scenes once (posterior means); cached at ``work/latents.pt``.

    Returns {"latents": float16 [N, C, h, w] raw latents, "combo": int64 [N] indices into
    ``combos``, "shift": float, "scale": float} where (z - shift) * scale has mean 0, std 1.
    """
    path = work / "latents.pt"
    if path.is_file():
        data = torch.load(path, map_location="cpu")
        if len(data["combo"]) == recipe.dit.dataset_size:
            return data
    images, scenes = render_dataset(int(step_rng(recipe.seed, STAGE_DATA, 0).integers(2**31)),
                                    recipe.dit.dataset_size, combos)
    index = {c: i for i, c in enumerate(combos)}
    chunks = []
    chunk = 1024 if device.type == "cuda" else 256
    for start in range(0, len(images), chunk):
        x = images_to_tensor(images[start:start + chunk]).to(device)
        chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
    latents = torch.cat(chunks)
    data = {"latents": latents.half(), "combo": torch.tensor([index[s.combo] for s in scenes]),
            "shift": latents.mean().item(), "scale": 1.0 / latents.std().item()}
    torch.save(data, path)
    log.info("encoded %d scenes: latent mean %.4f, std %.4f", len(images), data["shift"], 1 / data["scale"])
    return data
