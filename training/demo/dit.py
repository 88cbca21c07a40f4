"""Stage 2: the FLUX DiT with its two text encoders, trained together by rectified flow matching.

For a clean latent x0 (normalised as FLUX does: (z - shift) * scale) and noise n, a time t in
(0, 1) gives x_t = (1 - t) x0 + t n; the DiT, called exactly as diffusers' ``FluxPipeline`` calls
it (packed 2x2 latents, ``timestep=t``, zero text ids), predicts the velocity n - x0. Sampling
with ``FlowMatchEulerDiscreteScheduler`` (shift 1) then walks t from 1 to 0.

The T5 and CLIP encoders get the caption tokens exactly as the pipeline tokenises them (T5
padded to ``max_sequence_length``, CLIP to 77, no attention mask) and learn with the DiT, so
the DiT can tell "a red circle ..., blue background" from "a blue circle ..., red background".
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ditserve.bench.tokenizers import CLIP_BOS, CLIP_EOS, clip_vocab, learn_clip_merges, save_clip_tokenizer, save_t5_tokenizer

from . import config
from .common import (STAGE_DIT, checkpoint_step, count_parameters, ema_update, load_checkpoint, lr_at, step_generator,
                     step_rng)
from .scenes import IMAGE_SIZE, Combo

log = logging.getLogger(__name__)

VAE_SCALE = 2 ** (len(config.VAE["block_out_channels"]) - 1)
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE
UNIFORM_T_FRACTION = 0.3  # the rest of the times are logit-normal (SD3): more weight mid-way


def save_tokenizers(folder: Path) -> tuple[int, int]:
    """Write ``tokenizer/`` (CLIP) and ``tokenizer_2/`` (T5) into ``folder``; return their vocab sizes."""
    clip_size = save_clip_tokenizer(folder / "tokenizer", words=config.TOKENIZER_WORDS)
    t5_size = save_t5_tokenizer(folder / "tokenizer_2", words=config.TOKENIZER_WORDS)
    return clip_size, t5_size


def build_text_encoders(seed: int, clip_size: int, t5_size: int) -> tuple[CLIPTextModel, T5EncoderModel]:
    vocab = clip_vocab(learn_clip_merges(config.TOKENIZER_WORDS))
    eos = vocab[CLIP_EOS]
    torch.manual_seed(seed + 1)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_size, bos_token_id=vocab[CLIP_BOS], eos_token_id=eos,
                                        pad_token_id=eos, **config.CLIP))
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(T5Config(vocab_size=t5_size, **config.T5))
    return clip, t5


def build_transformer(seed: int) -> FluxTransformer2DModel:
    """The DiT with adaLN-Zero init (as DiT): every block starts as the identity, the output as 0."""
    torch.manual_seed(seed + 3)
    dit = FluxTransformer2DModel(**config.TRANSFORMER)
    zero = [b.norm1.linear for b in dit.transformer_blocks] + [b.norm1_context.linear for b in dit.transformer_blocks]
    zero += [b.norm.linear for b in dit.single_transformer_blocks] + [dit.norm_out.linear, dit.proj_out]
    with torch.no_grad():
        for layer in zero:
            layer.weight.zero_()
            layer.bias.zero_()
    return dit


class Denoiser(torch.nn.Module):
    """Text encoders + DiT: token ids and a noisy packed latent in, velocity out."""

    def __init__(self, dit: FluxTransformer2DModel, clip: CLIPTextModel, t5: T5EncoderModel):
        super().__init__()
        self.dit, self.clip, self.t5 = dit, clip, t5
        grid = LATENT_SIZE // 2
        self.register_buffer("img_ids", FluxPipeline._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32),
                             persistent=False)
        self.register_buffer("txt_ids", torch.zeros(config.MAX_SEQUENCE_LENGTH, 3), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, t5_ids: torch.Tensor, clip_ids: torch.Tensor) -> torch.Tensor:
        txt = self.t5(t5_ids, output_hidden_states=False)[0]
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        return self.dit(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                        img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)[0]


def caption_variants(combo: Combo) -> tuple[str, str, str, str]:
    """Ways a person may write a caption, all trained: as generated; "an" before a vowel ("an orange
    circle"); and both with a capital first letter (T5 is case-sensitive). Always four, repeats allowed."""
    base = combo.caption
    article = "an" + base[1:] if combo.color[0] in "aeiou" else base
    return base, base[0].upper() + base[1:], article, article[0].upper() + article[1:]


def token_tables(folder: Path, combos: list[Combo]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 ids [K, V, max_sequence_length] and CLIP ids [K, V, 77] of each combo's V caption variants,
    tokenised exactly as diffusers' FluxPipeline tokenises prompts."""
    captions = [v for c in combos for v in caption_variants(c)]
    clip_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip_ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
    t5_ids = t5_tok(captions, padding="max_length", max_length=config.MAX_SEQUENCE_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    longest = max(len(t5_tok(c).input_ids) for c in captions)
    if longest > config.MAX_SEQUENCE_LENGTH:
        raise ValueError(f"captions need {longest} T5 tokens; MAX_SEQUENCE_LENGTH is {config.MAX_SEQUENCE_LENGTH}")
    return t5_ids.view(len(combos), -1, t5_ids.shape[-1]), clip_ids.view(len(combos), -1, clip_ids.shape[-1])


def pack(latents_BCHW: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents_BCHW.shape
    return FluxPipeline._pack_latents(latents_BCHW, b, c, h, w)


def sample_times(gen: torch.Generator, n: int) -> torch.Tensor:
    logit_normal = torch.sigmoid(torch.randn(n, generator=gen))
    uniform = torch.rand(n, generator=gen)
    return torch.where(torch.rand(n, generator=gen) < UNIFORM_T_FRACTION, uniform, logit_normal)


def flow_matching_loss(model: Denoiser, x0: torch.Tensor, t5_ids, clip_ids, gen: torch.Generator) -> torch.Tensor:
    """MSE between the predicted and the true velocity (noise - x0) at x_t = (1 - t) x0 + t noise."""
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    t = sample_times(gen, x0.shape[0]).to(x0.device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return F.mse_loss(model(x_t, t, t5_ids, clip_ids), noise - x0)


def build_denoiser(seed: int, folder: Path) -> Denoiser:
    clip_size, t5_size = save_tokenizers(folder)
    clip, t5 = build_text_encoders(seed, clip_size, t5_size)
    return Denoiser(build_transformer(seed), clip, t5)


def train_dit(work: Path, recipe: config.Recipe, data: dict, combos: list[Combo], device: torch.device,
              deadline: float | None = None, stop_after: int | None = None) -> Denoiser:
    """Train (or resume, or just load) the denoiser checkpointed at ``work/dit.ckpt``; returns the EMA model.

    It stops (checkpointed) after step ``stop_after`` of the recipe's schedule if given, or early
    past ``deadline`` (a ``time.monotonic()`` value); the command without them resumes.
    """
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
    log.info("DiT %.2f M + CLIP %.2f M + T5 %.2f M parameters, steps %d -> %d on %s",
             count_parameters(model.dit) / 1e6, count_parameters(model.clip) / 1e6, count_parameters(model.t5) / 1e6,
             start, cfg.steps, device)

    t5_table, clip_table = (t.to(device) for t in token_tables(work, combos))
    latents = ((data["latents"].float() - data["shift"]) * data["scale"]).to(device)
    combo_of = data["combo"].to(device)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    model.train()
    clock, seen, running = time.perf_counter(), 0, None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    for step in range(start, end):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        rng = step_rng(recipe.seed, STAGE_DIT, step)
        idx = torch.from_numpy(rng.integers(len(latents), size=cfg.batch_size)).to(device)
        variant = torch.from_numpy(rng.integers(t5_table.shape[1], size=cfg.batch_size)).to(device)
        combo = combo_of[idx]
        loss = flow_matching_loss(model, pack(latents[idx]), t5_table[combo, variant], clip_table[combo, variant],
                                  step_generator(recipe.seed, STAGE_DIT, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema_update(ema_params, params, step, cfg.ema_decay)
        seen += 1
        # a running mean kept on the device: no host sync per step
        running = loss.detach() if running is None else running.lerp(loss.detach(), 0.02)
        if (step + 1) % cfg.log_every == 0:
            rate = seen / (time.perf_counter() - clock)
            log.info("dit step %d/%d  loss %.4f (avg %.4f)  lr %.2e  %.2f step/s", step + 1, cfg.steps, loss.item(),
                     running.item(), opt.param_groups[0]["lr"], rate)
        if checkpoint_step(ckpt_path, {"model": model, "ema": ema, "opt": opt}, step, end, cfg.ckpt_every, deadline):
            log.warning("DiT: out of time after step %d of %d; rerun to resume", step + 1, cfg.steps)
            break
    return ema.eval()
