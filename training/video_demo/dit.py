"""Stage 2: the Wan DiT with its UMT5 text encoder, trained together by rectified flow matching.

For a clean latent x0 (normalised as Wan's pipeline undoes it: (z - mean) / std per channel) and
noise n, a time t in (0, 1) gives x_t = (1 - t) x0 + t n; diffusers' ``WanTransformer3DModel``,
called as ``WanPipeline`` calls it (``timestep = 1000 t``, UMT5 states zeroed after each prompt's
tokens), predicts the velocity n - x0, which the UniPC flow scheduler integrates from t = 1 to 0.

UMT5 sees each caption exactly as the pipeline tokenises it (padded to ``MAX_SEQUENCE_LENGTH``, with
its attention mask). One caption in ten is replaced by the empty prompt, so CFG is available.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from ditserve.bench.tokenizers import save_t5_tokenizer
from training.demo.common import (
    STAGE_DIT,
    count_parameters,
    load_checkpoint,
    save_checkpoint,
    step_generator,
    step_rng,
)
from training.demo.dit import caption_variants, sample_times

from . import config
from .common import autocast, lr_now
from .scenes import Combo

log = logging.getLogger(__name__)


def save_tokenizer(folder: Path) -> int:
    """Write ``tokenizer/`` (a Unigram T5TokenizerFast, as Wan's) into ``folder``; return its vocab size."""
    return save_t5_tokenizer(folder / "tokenizer", words=config.TOKENIZER_WORDS)


def build_text_encoder(seed: int, vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(seed + 1)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **config.UMT5))


def build_transformer(seed: int) -> WanTransformer3DModel:
    """The DiT, every block starting as the identity and the output as 0 (adaLN-Zero, as DiT): the
    blocks' modulation (time projection and tables) and the output projection start at zero."""
    torch.manual_seed(seed + 3)
    dit = WanTransformer3DModel(**config.TRANSFORMER)
    with torch.no_grad():
        for p in (dit.condition_embedder.time_proj.weight, dit.condition_embedder.time_proj.bias,
                  dit.proj_out.weight, dit.proj_out.bias, *(b.scale_shift_table for b in dit.blocks)):
            p.zero_()
    return dit


class Denoiser(torch.nn.Module):
    """UMT5 + DiT: token ids (with their mask) and a noisy latent in, velocity out."""

    def __init__(self, dit: WanTransformer3DModel, text_encoder: UMT5EncoderModel):
        super().__init__()
        self.dit, self.text_encoder = dit, text_encoder

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """UMT5 states, zero after each prompt's tokens (as ``WanPipeline._get_t5_prompt_embeds``)."""
        states = self.text_encoder(ids, mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dit(hidden_states=x, timestep=t * 1000, encoder_hidden_states=self.encode(ids, mask),
                        return_dict=False)[0]


def build_denoiser(seed: int, folder: Path) -> Denoiser:
    return Denoiser(build_transformer(seed), build_text_encoder(seed, save_tokenizer(folder)))


def token_tables(folder: Path, combos: list[Combo]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks [K + 1, V, MAX_SEQUENCE_LENGTH] of each combo's V caption variants, as
    ``WanPipeline`` tokenises prompts; the last row (all V alike) is the empty prompt."""
    captions = [v for c in combos for v in caption_variants(c)]
    variants = len(captions) // len(combos)
    captions += [""] * variants
    tok = T5TokenizerFast.from_pretrained(folder / "tokenizer")
    out = tok(captions, padding="max_length", max_length=config.MAX_SEQUENCE_LENGTH, truncation=True,
              add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    longest = max(len(tok(c).input_ids) for c in captions)
    if longest > config.MAX_SEQUENCE_LENGTH:
        raise ValueError(f"captions need {longest} tokens; MAX_SEQUENCE_LENGTH is {config.MAX_SEQUENCE_LENGTH}")
    shape = (len(combos) + 1, variants, config.MAX_SEQUENCE_LENGTH)
    return out.input_ids.view(shape), out.attention_mask.view(shape)


def normalised_latents(data: dict) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    mean, std = torch.tensor(data["mean"]).view(shape), torch.tensor(data["std"]).view(shape)
    return (data["latents"].float() - mean) / std


def flow_matching_loss(model: Denoiser, x0: torch.Tensor, ids, mask, gen: torch.Generator) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) at x_t = (1 - t) x0 + t noise."""
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = sample_times(gen, x0.shape[0]).to(x0.device)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    return F.mse_loss(model(x_t, t, ids, mask).float(), noise - x0)


def train_dit(work: Path, recipe: config.Recipe, data: dict, combos: list[Combo], device: torch.device,
              deadline: float | None = None, stop_after: int | None = None) -> Denoiser:
    """Train (or resume, or just load) the denoiser checkpointed at ``work/dit.ckpt``; returns the EMA
    model. Stops (checkpointed) after step ``stop_after`` or past ``deadline``; rerun to resume."""
    cfg = recipe.dit
    model = build_denoiser(recipe.seed, work).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path, start = work / "dit.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    log.info("DiT %.2f M + UMT5 %.2f M parameters, steps %d -> %d on %s (batch %d)",
             count_parameters(model.dit) / 1e6, count_parameters(model.text_encoder) / 1e6, start, cfg.steps, device,
             cfg.batch_size)
    ids_table, mask_table = (t.to(device) for t in token_tables(work, combos))
    empty = ids_table.shape[0] - 1
    latents = normalised_latents(data).to(device)
    combo_of = data["combo"].to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    model.train()
    clock, started, seen, running = time.perf_counter(), time.monotonic(), 0, None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_now(step, cfg.lr, cfg.warmup, cfg.steps, started, deadline)
        rng = step_rng(recipe.seed, STAGE_DIT, step)
        idx = torch.from_numpy(rng.integers(len(latents), size=cfg.batch_size)).to(device)
        variant = torch.from_numpy(rng.integers(ids_table.shape[1], size=cfg.batch_size)).to(device)
        uncond = torch.from_numpy(rng.random(cfg.batch_size) < cfg.uncond_prob).to(device)
        row = torch.where(uncond, torch.full_like(idx, empty), combo_of[idx])
        with autocast(recipe, device):
            loss = flow_matching_loss(model, latents[idx], ids_table[row, variant], mask_table[row, variant],
                                      step_generator(recipe.seed, STAGE_DIT, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        seen += 1
        # a running mean kept on the device: no host sync per step
        running = loss.detach() if running is None else running.lerp(loss.detach(), 0.02)
        if (step + 1) % cfg.log_every == 0:
            rate = seen / (time.perf_counter() - clock)
            log.info("dit step %d/%d  loss %.4f (avg %.4f)  lr %.2e  %.2f step/s", step + 1, cfg.steps, loss.item(),
                     running.item(), opt.param_groups[0]["lr"], rate)
        out_of_time = deadline is not None and time.monotonic() > deadline
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == end or out_of_time:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                        "opt": opt.state_dict(), "step": step + 1})
        if out_of_time:
            log.warning("DiT: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return ema.eval()
