"""CogVideoX (2B, 5B, 1.5-5B): T5 text, the CogVideoX video VAE, one DiT, CFG, DDIM or DPM.

- `CogVideoXPipeline`: text-to-video.
- `CogVideoXImageToVideoPipeline`: the input image, resized to the video size, is encoded (a posterior
  sample drawn from the request's generator) as the first latent frame of a condition clip (the rest
  zeros) that is concatenated to the noisy latents' channels.

As in diffusers: T5 states for prompts padded to 226 tokens with no attention mask (the padding
matters); CFG when guidance > 1 (negative prompt "" by default), here batched cond-then-uncond into
one call; with dynamic CFG the scale grows over the run as `1 + g·(1 - cos(π·((N - t)/N)^5))/2` of the
step's timestep t (diffusers' formula, which reads t where a step index would be expected);
CogVideoX1.5 pads the latent frames to whole temporal patches at the front and drops them before
decoding. Noise and latents are float32 (diffusers keeps them in the model dtype); the model runs in
its dtype.

Dynamic CFG is per request (`use_dynamic_cfg`, off by default as in diffusers); a folder's
`ditserve.json` can turn it on by default: `{"defaults": {"use_dynamic_cfg": true}}` (CogVideoX's own
demo uses it with the DPM scheduler).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from ditserve.api import GenerationRequest, InvalidRequest, ModelLimits, RequestDefaults
from ditserve.encoders.text import T5SequenceEncoder, load_pretrained
from ditserve.encoders.umt5 import component_class
from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXDiT, CogVideoXInputs
from ditserve.models.cogvideox.weights import load_cogvideox_dit
from ditserve.models.common.dit import StepContext
from ditserve.pipelines.base import Frames, Pipeline, RunControl, StageTimer
from ditserve.pipelines.denoise import Sampling, denoise
from ditserve.pipelines.stages import repeat_per_image
from ditserve.sampling.cogvideox import CogVideoXDPM, RequestNoise
from ditserve.sampling.guidance import (
    ClassifierFree,
    ModelCall,
    NoGuidance,
    cfg_combine,
)
from ditserve.sampling.scheduler_config import read_scheduler_config
from ditserve.vae.cogvideox import (
    CogVideoXLatentShape,
    decode_cogvideox,
    encode_cogvideox_image,
    load_cogvideox_vae,
)
from ditserve.vae.kl import image_to_tensor

log = logging.getLogger(__name__)

DEFAULTS = RequestDefaults(height=480, width=720, num_inference_steps=50, guidance_scale=6.0,
                           max_sequence_length=226, num_frames=49, fps=8)
# 8k + 1 frames: the VAE decodes two latent frames at a time, so only an odd latent count comes back whole;
# `sampler` may only name the folder's own (ddim or dpm: for_folder)
LIMITS = ModelLimits(size_multiple=16, max_sequence_length=226, frame_multiple=8, max_frames=161, max_num_images=4,
                     max_pixels=1360 * 1360, samplers=("ddim", "dpm"), dynamic_cfg=True)
# CogVideoX1.5: its model card's size and rate (diffusers' default, 8x its 300x300 sample size, is no video size)
DEFAULTS_15 = dict(height=768, width=1360, num_frames=81, fps=16)
UNCOND_COND = ("uncond", "cond")


def dynamic_cfg_scale(scale: float, t: float, num_steps: int) -> float:
    """diffusers' `use_dynamic_cfg` scale at timestep t (the timestep value, as diffusers reads it)."""
    return 1 + scale * ((1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2)


@dataclass(frozen=True)
class UncondFirstCFG(ClassifierFree):
    """Batched CFG with the unconditional half first, as diffusers' CogVideoX pipelines batch it: on
    the CPU a GEMM can round a row differently at another offset, and the DPM steps amplify that."""

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        if not self.batched:
            return super().predict(call, x, expert)
        uncond, cond = call(torch.cat([x, x]), UNCOND_COND).chunk(2)
        return cfg_combine(cond, uncond, self.scale)


@dataclass
class DynamicCFG:
    """Classifier-free guidance whose per-sample scales change each step: `scales` [steps, N].
    Built fresh for every run by the sampling stage: it counts the run's steps itself (guidance is
    called once per step)."""

    scales: torch.Tensor
    _step: int = field(default=0, repr=False)

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        uncond, cond = call(torch.cat([x, x]), UNCOND_COND).chunk(2)
        pred = cfg_combine(cond, uncond, self.scales[self._step])
        self._step += 1
        return pred


@dataclass
class CogVideoXLatents:
    """Noisy latents [N, F, C, h, w] (float32; 1.5: `pad` extra frames at the front), the run's
    generators (the DPM solver draws from them), and for image-to-video the image latents [N, F, C, h, w]
    concatenated to the model input's channels."""

    x: torch.Tensor
    noise: RequestNoise
    pad: int = 0
    image: torch.Tensor | None = None


class CogVideoXPipeline(Pipeline):
    defaults: ClassVar[RequestDefaults] = DEFAULTS
    limits: ClassVar[ModelLimits] = LIMITS

    def __init__(self, dit: CogVideoXDiT, text: T5SequenceEncoder, vae, scheduler_spec, device: torch.device,
                 dtype: torch.dtype):
        self.dit, self.text, self.vae = dit, text, vae
        self.scheduler_spec = scheduler_spec
        self.device, self.dtype = device, dtype
        self.shape = CogVideoXLatentShape.from_config(dict(vae.config))

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> CogVideoXPipeline:
        index = json.loads((path / "model_index.json").read_text())
        tokenizer = component_class(index, "tokenizer", "T5TokenizerFast").from_pretrained(str(path / "tokenizer"))
        model = load_pretrained(component_class(index, "text_encoder", "T5EncoderModel"), path / "text_encoder",
                                device, dtype)
        return cls(
            dit=load_cogvideox_dit(path / "transformer", device, dtype),
            text=T5SequenceEncoder(tokenizer, model),
            vae=load_cogvideox_vae(path / "vae", device, torch.float32 if device.type == "cpu" else dtype),
            scheduler_spec=read_scheduler_config(path / "scheduler" / "scheduler_config.json"),
            device=device, dtype=dtype,
        )

    @classmethod
    def for_folder(cls, path: Path, defaults: RequestDefaults, limits: ModelLimits):
        """Defaults from the transformer's sample size (as diffusers; 1.5: its model card's). The
        transformer config and `ditserve.json` are read strictly here, before any weights load."""
        try:
            cfg = CogVideoXConfig.from_json(path / "transformer" / "config.json")
            vae = CogVideoXLatentShape.read(path / "vae")
        except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
            raise InvalidRequest(f"{path}: {str(exc).splitlines()[0]}", "model") from None
        if cfg.patch_size_t is not None:
            defaults = replace(defaults, **DEFAULTS_15)
        else:
            defaults = replace(defaults, height=cfg.sample_height * vae.spatial, width=cfg.sample_width * vae.spatial,
                               num_frames=cfg.sample_frames)
        sampler = read_scheduler_config(path / "scheduler" / "scheduler_config.json").default_sampler
        return replace(defaults, max_sequence_length=cfg.max_text_seq_length), replace(
            limits, max_sequence_length=cfg.max_text_seq_length, size_multiple=vae.spatial * cfg.patch_size,
            samplers=(sampler,), refuse=partial(refuse, cfg, vae.spatial))

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.dit, "text_encoder": self.text.model, "vae": self.vae}

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        return (req.height, req.width, req.num_frames, req.num_inference_steps, req.guidance_scale > 1,
                req.max_sequence_length, req.sampler, req.flow_shift, bool(req.images), req.use_dynamic_cfg)

    def uses_negative_prompt(self, req: GenerationRequest) -> bool:
        return req.guidance_scale > 1

    def check(self, req: GenerationRequest) -> None:
        refuse(self.dit.cfg, self.shape.spatial, req)

    def run(self, requests: list[GenerationRequest], control: RunControl):
        for req in requests:
            self.check(req)
        return super().run(requests, control)

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> torch.Tensor:
        states = self.text(prompts, requests[0].max_sequence_length)
        return repeat_per_image(states.to(self.dtype), requests)

    def latent_frames(self, num_frames: int) -> tuple[int, int]:
        """Latent frames of a clip and, for 1.5, how many are added at the front to fill the last patch."""
        f = self.shape.latent_frames(num_frames)
        pt = self.dit.cfg.patch_size_t
        return f, (pt - f % pt if pt is not None and f % pt else 0)

    def prepare_latents(self, requests: list[GenerationRequest]) -> CogVideoXLatents:
        req = requests[0]
        f, pad = self.latent_frames(req.num_frames)
        shape = (f + pad, self.dit.cfg.in_channels, req.height // self.shape.spatial, req.width // self.shape.spatial)
        x, noise, _ = self.noise(requests, shape)
        return CogVideoXLatents(x, noise, pad=pad)

    def noise(self, requests: list[GenerationRequest], shape: tuple[int, ...],
              before=None) -> tuple[torch.Tensor, RequestNoise, list]:
        """Initial noise drawn as diffusers draws it (one CPU generator per request, seeded with its
        seed), the generators (they stay with the run for the DPM solver), and what
        `before(req, generator)` returned per request: it draws first, as the I2V image encoding does."""
        gens = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        first = [before(r, g) for r, g in zip(requests, gens)] if before is not None else []
        draws = [torch.randn((r.num_images, *shape), generator=g, dtype=torch.float32) for r, g in zip(requests, gens)]
        return torch.cat(draws).to(self.device), RequestNoise(gens, [r.num_images for r in requests]), first

    def sampling(self, latents: CogVideoXLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler)
        if isinstance(solver, CogVideoXDPM):
            solver = solver.for_run(latents.noise)
        sched = solver.schedule(req.num_inference_steps)
        guidance = NoGuidance()
        if req.guidance_scale > 1:
            scales = [r.guidance_scale for r in requests]
            if req.use_dynamic_cfg:
                steps = req.num_inference_steps
                table = torch.tensor([[dynamic_cfg_scale(s, float(t), steps) for s in scales]
                                      for t in sched.timesteps.tolist()], dtype=torch.float64)
                guidance = DynamicCFG(repeat_per_image(table.T, requests).T.contiguous())
            else:
                guidance = UncondFirstCFG(repeat_per_image(torch.tensor(scales, dtype=torch.float64), requests))
        return Sampling(sched, solver, guidance)

    def denoise(self, latents: CogVideoXLatents, cond: torch.Tensor, uncond: torch.Tensor | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> CogVideoXLatents:
        texts = {("cond",): cond}
        if uncond is not None:
            texts |= {("uncond",): uncond, ("cond", "uncond"): torch.cat([cond, uncond]),
                      UNCOND_COND: torch.cat([uncond, cond])}
        rope = self.dit.positional_tables(self.dit.grid(latents.x.shape), cond.shape[1], self.device)

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            x = x.to(self.dtype)
            if latents.image is not None:
                x = torch.cat([x, latents.image.repeat(len(ctx.branches), 1, 1, 1, 1).to(self.dtype)], dim=2)
            return self.dit(CogVideoXInputs(x, t, texts[ctx.branches], rope), ctx).float()

        x = denoise(latents.x, sampling, model, control, timer)
        return CogVideoXLatents(x[:, latents.pad:], latents.noise)

    def decode(self, latents: CogVideoXLatents) -> Frames:
        return Frames(decode_cogvideox(self.vae, latents.x, self.shape))


class CogVideoXImageToVideoPipeline(CogVideoXPipeline):
    limits = replace(LIMITS, min_images=1, max_images=1)

    def prepare_latents(self, requests: list[GenerationRequest]) -> CogVideoXLatents:
        """The image latents (a posterior sample, drawn from the request's generator before its noise)
        as frame 0 of a zero clip as long as the (1.5: padded) noisy latents."""
        req = requests[0]
        f, pad = self.latent_frames(req.num_frames)
        c, h, w = self.dit.cfg.in_channels // 2, req.height // self.shape.spatial, req.width // self.shape.spatial

        def encode(r: GenerationRequest, gen: torch.Generator) -> torch.Tensor:
            pixels = image_to_tensor(r.images[-1], r.width, r.height).to(self.device)
            return torch.cat([encode_cogvideox_image(self.vae, pixels, self.shape, gen) for _ in range(r.num_images)])

        x, noise, images = self.noise(requests, (f + pad, c, h, w), before=encode)
        image = torch.cat(images).to(self.device)
        image = torch.cat([image, image.new_zeros(image.shape[0], f + pad - 1, c, h, w)], dim=1)
        return CogVideoXLatents(x, noise, pad, image)


def refuse(cfg: CogVideoXConfig, spatial: int, req: GenerationRequest) -> None:
    """What the other limits cannot say, from the transformer's config (ModelLimits.refuse: the
    request is refused at the edge, before any model work)."""
    if req.guidance_scale_2 is not None:
        raise InvalidRequest("guidance_scale_2 is for two-expert models (Wan 2.2 A14B); CogVideoX has one DiT",
                             "guidance_scale_2")
    if req.flow_shift is not None:
        raise InvalidRequest("flow_shift: CogVideoX runs its own DDIM/DPM schedule, which has no shift",
                             "flow_shift")
    positions = cfg.sincos_positions or cfg.use_learned_positional_embeddings
    if positions and req.max_sequence_length != cfg.max_text_seq_length:
        raise InvalidRequest(f"max_sequence_length must be {cfg.max_text_seq_length} for this CogVideoX model "
                             f"(its position table is laid out for that many text tokens), got "
                             f"{req.max_sequence_length}", "max_sequence_length")
    if cfg.patch_size_t is not None:  # 1.5: its rotary grid is sliced from the trained one
        h, w = cfg.sample_height * spatial, cfg.sample_width * spatial
        if req.height > h or req.width > w:
            raise InvalidRequest(f"this CogVideoX1.5 model's positions reach {w}x{h}, got "
                                 f"{req.width}x{req.height}", "size")
    if cfg.use_learned_positional_embeddings:
        h, w = cfg.sample_height * spatial, cfg.sample_width * spatial
        if (req.height, req.width) != (h, w):
            raise InvalidRequest(f"this CogVideoX model has learned positions for {w}x{h} only, got "
                                 f"{req.width}x{req.height}", "size")
