"""Stage 1: the video autoencoder (diffusers ``AutoencoderKLWan``), trained on short clips, then
(GPU recipe) fine-tuned on 17-frame ones.

Every step draws its own clips, or (GPU recipe) picks them from a bank drawn once on the device.
The VAE is causal and runs 1 + 4 + 4 ... frames in chunks, each with a cache of the chunk before:
it learns fastest on short clips, but what it learns there does not carry to the later chunks of a
17-frame clip (H200: trained on 9 frames, L1 per chunk 0.027 0.022 0.024 0.089 0.418), and trained
on 17-frame clips from scratch for as long it dropped the shapes, so the GPU recipe does both in
turn. Loss: L1 + MSE reconstruction of the posterior sample with the shape's pixels weighted up,
taken before the decoder's final clamp to [-1, 1] (``decode_unclamped``), plus a very small KL term. Afterwards the recipe's clip set (17 frames) is
encoded once for stage 2, and the latents' per-channel mean and spread become the VAE's
``latents_mean`` and ``latents_std`` (as Wan's: the pipeline decodes ``x * std + mean``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from training.demo.common import (
    STAGE_DATA,
    STAGE_VAE,
    checkpoint_step,
    count_parameters,
    load_checkpoint,
    step_rng,
)

from . import config
from .common import (
    autocast,
    capture_step,
    device_generator,
    lr_now,
    lr_tensors_on,
    lr_value,
    make_adamw,
    set_lr,
)
from .scenes import IMAGE_SIZE, NUM_FRAMES, Combo, render_clips, sample_clip

log = logging.getLogger(__name__)

STAGE_VAE_LONG = STAGE_VAE + 100  # the 17-frame phase's per-step randomness


def build_vae(seed: int, spatial: int = 8) -> AutoencoderKLWan:
    """A fresh VAE whose posterior starts nearly deterministic: the log-variance half of
    ``quant_conv``'s bias starts at ``config.VAE_LOGVAR_INIT``. With diffusers' init the posterior's
    std starts near 1, the sampled latent is mostly noise, and the encoder collapsed towards the prior
    instead of learning (KL 1150 -> 130 in 300 CPU steps, reconstruction stuck near 0.9)."""
    torch.manual_seed(seed)
    z = config.LATENT_CHANNELS
    vae = AutoencoderKLWan(**config.VAE_CONFIGS[spatial], latents_mean=[0.0] * z, latents_std=[1.0] * z)
    with torch.no_grad():
        vae.quant_conv.bias[z:].fill_(config.VAE_LOGVAR_INIT)
    return vae


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` without its final clamp to [-1, 1], for training: past the clamp a
    pixel has no gradient, so one that overshoots (targets sit at exactly -1 or 1 for pure colors)
    would stay saturated. Same chunking and feature cache as ``AutoencoderKLWan._decode``."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    chunks = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        chunks.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(chunks, 2)


def clips_to_tensor(clips: torch.Tensor) -> torch.Tensor:
    """uint8 [N, T, H, W, 3] -> float [N, 3, T, H, W] in [-1, 1], as diffusers' video VAEs expect."""
    return clips.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def clip_bank(recipe: config.Recipe, cfg: config.VaeTraining, combos: list[Combo],
              device: torch.device) -> torch.Tensor:
    """``cfg.bank_size`` clips of ``cfg.frames`` frames, drawn once (seeded) and kept on ``device`` as
    uint8 [N, T, H, W, 3]: the GPU recipe's VAE steps index it instead of drawing."""
    # (STAGE_DATA, 0) draws the DiT's clip set; 1 the short-clip bank, 2 the 17-frame bank
    rng = step_rng(recipe.seed, STAGE_DATA, 1 if cfg.frames < NUM_FRAMES else 2)
    clips = [sample_clip(rng, combos, cfg.frames) for _ in range(cfg.bank_size)]
    size = 4096
    return torch.cat([render_clips(clips[i:i + size], cfg.frames, device) for i in range(0, len(clips), size)])


def background_mask(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel of the clips ``x`` [N, 3, T, H, W] shows the shape, 0 on the flat background
    (the median of the four corners: a 14-20 px shape covers at most one of them)."""
    corners = torch.stack([x[..., 0, 0], x[..., 0, -1], x[..., -1, 0], x[..., -1, -1]], -1)
    background = corners.median(-1).values[..., None, None]
    return ((x - background).abs().amax(1, keepdim=True) > 1e-3).float()


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """L1 + MSE, with the shape's pixels weighted ``1 + fg_weight`` (the shape is 5-10% of a frame;
    unweighted, a VAE short of steps reconstructs the background and drops the shape)."""
    err = (recon - x).abs() + (recon - x).square()
    if not fg_weight:
        return err.mean()
    weight = 1.0 + fg_weight * background_mask(x)
    return (err * weight).mean() / weight.mean()


def load_vae(work: Path, recipe: config.Recipe, device: torch.device) -> tuple[AutoencoderKLWan, int]:
    """The VAE as ``work``'s checkpoints hold it (the 17-frame phase's if it has begun), with its
    steps in all (the key ``encode_dataset`` caches by), not trained further."""
    model = build_vae(recipe.seed, recipe.vae_spatial).to(device)
    steps = 0
    for path in (work / "vae.ckpt", work / "vae_long.ckpt"):
        if (state := load_checkpoint(path)) is not None:
            model.load_state_dict(state["model"])
            steps += state["step"]
    return model.eval().requires_grad_(False), steps


def train_vae(work: Path, recipe: config.Recipe, combos: list[Combo], device: torch.device,
              deadline: float | None = None, stop_after: int | None = None) -> tuple[AutoencoderKLWan, int]:
    """Train (or resume, or just load) the VAE; returns it with the number of steps it has had.

    Phase one (``recipe.vae``, checkpoint ``work/vae.ckpt``) trains on short clips, where it learns
    fast; phase two (``recipe.vae_long``, ``work/vae_long.ckpt``), if the recipe has one, fine-tunes
    it on 17-frame clips for the last ``recipe.vae_long_share`` of the time, so that every chunk of
    the causal loop is trained. Stops (checkpointed) after phase one's step ``stop_after`` or past
    ``deadline`` (a ``time.monotonic()`` value); the same command without them resumes."""
    model = build_vae(recipe.seed, recipe.vae_spatial).to(device)
    long_ckpt = work / "vae_long.ckpt"
    long = recipe.vae_long
    if long is None or not long_ckpt.is_file():
        phase_deadline = deadline
        if long is not None and deadline is not None:
            phase_deadline = time.monotonic() + (1 - recipe.vae_long_share) * (deadline - time.monotonic())
        steps, finished = _train_phase(model, recipe, recipe.vae, work / "vae.ckpt", combos, device, phase_deadline,
                                       stop_after, "VAE")
        if long is None or (not finished and (stop_after is not None or deadline is None)):
            return model.eval().requires_grad_(False), steps
    else:
        steps = load_checkpoint(work / "vae.ckpt")["step"]
    long_steps, _ = _train_phase(model, recipe, long, long_ckpt, combos, device, deadline, None, "VAE (17 frames)")
    return model.eval().requires_grad_(False), steps + long_steps


def _train_phase(model: AutoencoderKLWan, recipe: config.Recipe, cfg: config.VaeTraining, ckpt_path: Path,
                 combos: list[Combo], device: torch.device, deadline: float | None, stop_after: int | None,
                 name: str) -> tuple[int, bool]:
    """One phase of VAE training on ``cfg``'s clips, resumed from ``ckpt_path`` if it exists (else
    from ``model`` as it is); returns (steps done, whether the deadline ended it or it finished)."""
    opt = make_adamw(model.parameters(), cfg.lr, device)
    start = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        lr_tensors_on(opt, device)
        start = state["step"]
    log.info("%s: %.2f M parameters, steps %d -> %d on %s (batch %d x %d frames)", name,
             count_parameters(model) / 1e6, start, cfg.steps, device, cfg.batch_size, cfg.frames)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if start >= end:
        return start, end == cfg.steps
    model.train()
    graphed = recipe.cuda_graphs and device.type == "cuda"
    bank = clip_bank(recipe, cfg, combos, device) if cfg.bank_size else None
    params = list(model.parameters())
    x = torch.zeros(cfg.batch_size, 3, cfg.frames, IMAGE_SIZE, IMAGE_SIZE, device=device)  # static inputs
    side = IMAGE_SIZE // model.config.scale_factor_spatial
    noise = torch.zeros(cfg.batch_size, config.LATENT_CHANNELS, 1 + (cfg.frames - 1) // 4, side, side, device=device)
    out: dict[str, torch.Tensor] = {}
    stage = STAGE_VAE if cfg.frames < NUM_FRAMES else STAGE_VAE_LONG

    def fill(step: int) -> None:
        """This step's clips and posterior noise into the static inputs."""
        gen = device_generator(recipe.seed, stage, step, device)
        if bank is None:
            rng = step_rng(recipe.seed, stage, step)
            clips = render_clips([sample_clip(rng, combos, cfg.frames) for _ in range(cfg.batch_size)], cfg.frames,
                                 device)
        else:
            clips = bank[torch.randint(len(bank), (cfg.batch_size,), generator=gen, device=device)]
        x.copy_(clips_to_tensor(clips))
        noise.copy_(torch.randn(noise.shape, generator=gen, device=device))

    def train_step() -> None:
        with autocast(recipe, device, graphed):
            posterior = model.encode(x).latent_dist
            recon = decode_unclamped(model, posterior.mean + posterior.std * noise).float()
        rec = reconstruction_loss(recon, x, cfg.fg_weight)
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        (rec + cfg.kl_weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        out["rec"], out["kl"] = rec.detach(), kl.detach()

    graph = None
    if graphed:
        fill(start)
        graph = capture_step(train_step, [model], opt, name)
    clock, started, seen, step = time.perf_counter(), time.monotonic(), 0, start - 1
    out_of_time = False
    for step in range(start, end):
        set_lr(opt, lr_now(step, cfg.lr, cfg.warmup, cfg.steps, started, deadline))
        fill(step)
        if graph is not None:
            graph.replay()
        else:
            opt.zero_grad(set_to_none=True)
            train_step()
        seen += 1
        if (step + 1) % cfg.log_every == 0:
            rec, kl = out["rec"].item(), out["kl"].item()  # waits for the GPU: the rate below is real
            rate = seen / (time.perf_counter() - clock)
            log.info("%s step %d/%d  rec %.4f  kl %.1f  lr %.2e  %.2f step/s", name, step + 1, cfg.steps, rec, kl,
                     lr_value(opt), rate)
        out_of_time = checkpoint_step(ckpt_path, {"model": model, "opt": opt}, step, end, cfg.ckpt_every, deadline)
        if out_of_time:
            log.warning("%s: out of time after step %d of %d; rerun to resume", name, step + 1, cfg.steps)
            break
    return step + 1, out_of_time or step + 1 == cfg.steps


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
    chunks, size = [], 1024 if device.type == "cuda" else 8
    for first in range(0, len(clips), size):
        x = clips_to_tensor(render_clips(clips[first:first + size], NUM_FRAMES, device))
        with autocast(recipe, device):
            chunks.append(vae.encode(x).latent_dist.mean.float().cpu())
        if deadline is not None and time.monotonic() > deadline and first + size < len(clips):
            log.warning("encoding: out of time after %d of %d clips; the DiT learns those", first + size, len(clips))
            clips = clips[:first + size]
            break
    latents = torch.cat(chunks)
    log_long_clip_error(vae, recipe, x[:64], device)
    per_channel = latents.transpose(0, 1).flatten(1)
    data = {"latents": latents.half(), "combo": torch.tensor([index[c.combo] for c in clips]),
            "mean": per_channel.mean(1).tolist(), "std": per_channel.std(1).clamp_min(1e-3).tolist(), "key": key}
    torch.save(data, path)
    log.info("encoded %d clips in %.1f s: latent shape %s, mean %.3f, std %.3f (over channels)", len(clips),
             time.perf_counter() - start, tuple(latents.shape[1:]), latents.mean().item(), latents.std().item())
    return data


@torch.no_grad()
def log_long_clip_error(vae: AutoencoderKLWan, recipe: config.Recipe, x: torch.Tensor, device: torch.device) -> None:
    """Log the mean L1 reconstruction error of 17-frame clips ``x`` per 4-frame chunk: a VAE that
    learned only the first chunks of its causal loop shows it here (the error grows chunk by chunk)."""
    with autocast(recipe, device):
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    per_frame = (y - x).abs().mean(dim=(0, 1, 3, 4)).tolist()
    chunks = [per_frame[:1]] + [per_frame[i:i + 4] for i in range(1, len(per_frame), 4)]
    log.info("17-frame reconstruction, L1 per causal chunk: %s", " ".join(f"{sum(c) / len(c):.3f}" for c in chunks))

