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
    checkpoint_step,
    count_parameters,
    ema_update,
    load_checkpoint,
)
from training.demo.dit import UNIFORM_T_FRACTION, caption_variants

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
        """UMT5 states, zero after each prompt's tokens (as ``WanPipeline._get_t5_prompt_embeds``).

        The padding mask goes in as the additive [B, 1, 1, L] float mask transformers would build
        from it (0 where kept, float32's minimum where padded): the same attention, without the
        host-side "is anything padded?" check on the 2-D mask, which would stall a CUDA graph."""
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        states = self.text_encoder(ids, attention_mask=bias).last_hidden_state
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


def sample_times_on(gen: torch.Generator, n: int) -> torch.Tensor:
    """``training.demo.dit.sample_times`` (logit-normal, a fraction uniform) on the generator's device."""
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen, device=gen.device))
    uniform = torch.rand(n, generator=gen, device=gen.device)
    return torch.where(torch.rand(n, generator=gen, device=gen.device) < UNIFORM_T_FRACTION, uniform, logit_normal)


def flow_matching_loss(model: Denoiser, x0: torch.Tensor, ids, mask, noise: torch.Tensor,
                       t: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) at x_t = (1 - t) x0 + t noise."""
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise
    return F.mse_loss(model(x_t, t, ids, mask).float(), noise - x0)


def load_weights_from(model: Denoiser, folder: Path) -> None:
    """The DiT and text encoder weights of a ``WanPipeline`` folder this training exported."""
    model.dit.load_state_dict(WanTransformer3DModel.from_pretrained(folder / "transformer").state_dict())
    model.text_encoder.load_state_dict(UMT5EncoderModel.from_pretrained(folder / "text_encoder").state_dict())


def train_dit(work: Path, recipe: config.Recipe, data: dict, combos: list[Combo], device: torch.device,
              deadline: float | None = None, stop_after: int | None = None,
              init_from: Path | None = None) -> Denoiser:
    """Train (or resume, or just load) the denoiser checkpointed at ``work/dit.ckpt``; returns the EMA
    model. Stops (checkpointed) after step ``stop_after`` or past ``deadline``; rerun to resume.

    Every step's batch, noise and times are drawn on the training device from a generator seeded by
    (seed, stage, step); on CUDA the step (forward, backward, clipping, AdamW) is replayed as a CUDA
    graph (``common.capture_step``) and the EMA update follows it. With ``init_from`` (an exported
    pipeline folder) and no checkpoint yet, the model and its EMA start from that folder's weights: a
    fine-tune with a fresh optimiser and the recipe's warm-up and cosine."""
    cfg = recipe.dit
    model = build_denoiser(recipe.seed, work)
    if init_from is not None and not (work / "dit.ckpt").is_file():
        load_weights_from(model, init_from)
        log.info("DiT and UMT5 start from %s", init_from)
    model = model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_adamw(model.parameters(), cfg.lr, device, cfg.weight_decay)
    ckpt_path, start = work / "dit.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        lr_tensors_on(opt, device)
        start = state["step"]
    log.info("DiT %.2f M + UMT5 %.2f M parameters, steps %d -> %d on %s (batch %d)",
             count_parameters(model.dit) / 1e6, count_parameters(model.text_encoder) / 1e6, start, cfg.steps, device,
             cfg.batch_size)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if start >= end:
        return ema.eval()
    ids_table, mask_table = (t.to(device) for t in token_tables(work, combos))
    empty = ids_table.shape[0] - 1
    latents = normalised_latents(data).to(device)
    combo_of = data["combo"].to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    model.train()
    graphed = recipe.cuda_graphs and device.type == "cuda"
    b = cfg.batch_size
    x0 = torch.zeros((b, *latents.shape[1:]), device=device)  # static inputs
    noise, t = torch.zeros_like(x0), torch.zeros(b, device=device)
    ids = torch.zeros((b, ids_table.shape[-1]), dtype=ids_table.dtype, device=device)
    mask = torch.zeros_like(ids, dtype=mask_table.dtype)
    out: dict[str, torch.Tensor] = {}

    def fill(step: int) -> None:
        gen = device_generator(recipe.seed, STAGE_DIT, step, device)
        idx = torch.randint(len(latents), (b,), generator=gen, device=device)
        variant = torch.randint(ids_table.shape[1], (b,), generator=gen, device=device)
        uncond = torch.rand(b, generator=gen, device=device) < cfg.uncond_prob
        row = torch.where(uncond, torch.full_like(idx, empty), combo_of[idx])
        x0.copy_(latents[idx])
        ids.copy_(ids_table[row, variant])
        mask.copy_(mask_table[row, variant])
        noise.copy_(torch.randn(x0.shape, generator=gen, device=device))
        t.copy_(sample_times_on(gen, b))

    def train_step() -> None:
        with autocast(recipe, device, graphed):
            loss = flow_matching_loss(model, x0, ids, mask, noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        out["loss"] = loss.detach()

    graph = None
    if graphed:
        fill(start)
        graph = capture_step(train_step, [model], opt, "DiT")
    clock, started, seen, running = time.perf_counter(), time.monotonic(), 0, None
    for step in range(start, end):
        set_lr(opt, lr_now(step, cfg.lr, cfg.warmup, cfg.steps, started, deadline))
        fill(step)
        if graph is not None:
            graph.replay()
        else:
            opt.zero_grad(set_to_none=True)
            train_step()
        ema_update(ema_params, params, step, cfg.ema_decay)
        seen += 1
        # a running mean kept on the device: no host sync per step
        loss = out["loss"].clone()
        running = loss if running is None else running.lerp(loss, 0.02)
        if (step + 1) % cfg.log_every == 0:
            rate = seen / (time.perf_counter() - clock)
            log.info("dit step %d/%d  loss %.4f (avg %.4f)  lr %.2e  %.2f step/s", step + 1, cfg.steps, loss.item(),
                     running.item(), lr_value(opt), rate)
        if checkpoint_step(ckpt_path, {"model": model, "ema": ema, "opt": opt}, step, end, cfg.ckpt_every, deadline):
            log.warning("DiT: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return ema.eval()
