"""Stage 1: the autoencoder (diffusers ``AutoencoderKL``), trained on the recipe's scene set.

Loss: L1 + MSE reconstruction of the posterior sample, plus a very small KL term (the
reconstruction is a per-pixel mean, so the KL weight is per image and tiny). After training,
every scene of the set is encoded once for stage 2, and the latents' mean and spread become
the VAE's ``shift_factor`` and ``scaling_factor`` (as FLUX's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import config
from .common import (STAGE_DATA, STAGE_VAE, checkpoint_step, count_parameters, images_to_tensor, load_checkpoint,
                     lr_at, step_generator, step_rng)
from .scenes import Combo, render_dataset

log = logging.getLogger(__name__)


def build_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**config.VAE)


def scene_set(recipe: config.Recipe, combos: list[Combo]) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's training scenes: uint8 images [N, 64, 64, 3] and their combo indices [N]."""
    seed = int(step_rng(recipe.seed, STAGE_DATA, 0).integers(2**31))
    images, scenes = render_dataset(seed, recipe.dataset_size, combos)
    index = {c: i for i, c in enumerate(combos)}
    return torch.from_numpy(images), torch.tensor([index[s.combo] for s in scenes])


Scenes = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> scene_set(...), drawn only when needed


def train_vae(work: Path, recipe: config.Recipe, scenes: Scenes, device: torch.device,
              deadline: float | None = None, stop_after: int | None = None) -> tuple[AutoencoderKL, int]:
    """Train (or resume, or just load) the VAE checkpointed at ``work/vae.ckpt`` on the scene images;
    returns it with the number of steps it has had.

    It stops (checkpointed) after step ``stop_after`` of the recipe's schedule if given, or early
    past ``deadline`` (a ``time.monotonic()`` value); the command without them resumes.
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
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    images = scenes()[0].to(device) if start < end else None
    model.train()
    clock, seen, step = time.perf_counter(), 0, start - 1
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        idx = torch.from_numpy(step_rng(recipe.seed, STAGE_VAE, step).integers(len(images), size=cfg.batch_size))
        x = images_to_tensor(images[idx.to(device)])
        posterior = model.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=step_generator(recipe.seed, STAGE_VAE, step))
        recon = model.decode(posterior.mean + posterior.std * noise.to(device)).sample
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
        if checkpoint_step(ckpt_path, {"model": model, "opt": opt}, step, end, cfg.ckpt_every, deadline):
            log.warning("VAE: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return model.eval().requires_grad_(False), step + 1


@torch.no_grad()
def encode_dataset(work: Path, recipe: config.Recipe, vae: AutoencoderKL, vae_steps: int, scenes: Scenes,
                   device: torch.device) -> dict:
    """Encode every scene once (posterior means); cached at ``work/latents.pt`` for this VAE step.

    Returns {"latents": float16 [N, C, h, w] raw latents, "combo": int64 [N] combo indices,
    "shift": float, "scale": float, "key": what they were made from} where (z - shift) * scale
    has mean 0 and std 1.
    """
    path = work / "latents.pt"
    key = {"seed": recipe.seed, "dataset_size": recipe.dataset_size, "vae_steps": vae_steps}
    if path.is_file():
        data = torch.load(path, map_location="cpu")
        if data.get("key") == key:
            return data
    images, combo = scenes()
    chunks, size = [], 1024 if device.type == "cuda" else 256
    for start in range(0, len(images), size):
        x = images_to_tensor(images[start:start + size].to(device))
        chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
    latents = torch.cat(chunks)
    data = {"latents": latents.half(), "combo": combo, "shift": latents.mean().item(),
            "scale": 1.0 / latents.std().item(), "key": key}
    torch.save(data, path)
    log.info("encoded %d scenes: latent mean %.4f, std %.4f", len(images), data["shift"], 1 / data["scale"])
    return data
