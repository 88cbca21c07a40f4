"""Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo): CLIP-L + CLIP-G + T5 text, 16-channel latents
patchified inside the DiT, flow-match Euler with the folder's shift, classifier-free guidance (uncond
and cond as one batch) and SD3.5-Medium's skip-layer guidance, as diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ditserve.api import GenerationRequest, InvalidRequest, ModelLimits, RequestDefaults
from ditserve.encoders.sd3_text import SD3Text, SD3TextEncoder
from ditserve.models.common.dit import StepContext
from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.model import SD3DiT, SD3Inputs
from ditserve.models.sd3.weights import load_sd3_dit
from ditserve.pipelines.base import Pipeline, Pixels, RunControl, StageTimer
from ditserve.pipelines.denoise import Sampling, denoise
from ditserve.pipelines.stages import initial_noise, repeat_per_image
from ditserve.sampling.guidance import ClassifierFree, ModelCall, NoGuidance, cfg_combine
from ditserve.sampling.scheduler_config import SchedulerSpec, read_scheduler_config
from ditserve.vae.kl import decode_kl, load_autoencoder_kl

log = logging.getLogger(__name__)

# diffusers' StableDiffusion3Pipeline.__call__ defaults for skip-layer guidance
SLG_SCALE, SLG_START, SLG_STOP = 2.8, 0.01, 0.2
SKIP = "cond_skip"  # the branch of the conditional pass with layers skipped


@dataclass
class SkipLayerGuidance:
    """Classifier-free guidance plus skip-layer guidance: on the run's steps in `steps`, one more
    conditional call with `layers` left out, and `scale * (cond - skipped)` added to the guided
    prediction (diffusers' formula). Built fresh for every run by the sampling stage: it counts the
    run's steps itself (guidance is called once per step)."""

    cfg: ClassifierFree
    scale: float
    steps: frozenset[int]
    _step: int = field(default=0, repr=False)

    def predict(self, call: ModelCall, x: torch.Tensor, expert: int = 0) -> torch.Tensor:
        cond, uncond = call(torch.cat([x, x]), ("cond", "uncond")).chunk(2)
        pred = cfg_combine(cond, uncond, self.cfg.scale)
        if self._step in self.steps:
            pred = pred + (cond - call(x, (SKIP,))) * self.scale
        self._step += 1
        return pred


def slg_steps(num_steps: int, start: float, stop: float) -> frozenset[int]:
    """The steps diffusers runs skip-layer guidance on: strictly between start and stop x steps."""
    return frozenset(i for i in range(num_steps) if num_steps * start < i < num_steps * stop)


@dataclass
class SD3Latents:
    """Latents [N, C, h, w] (patchified inside the DiT)."""

    x: torch.Tensor


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class StableDiffusion3Pipeline(Pipeline):
    defaults = RequestDefaults(height=1024, width=1024, num_inference_steps=28, guidance_scale=7.0,
                               true_cfg_scale=1.0, max_sequence_length=256)
    limits = ModelLimits(size_multiple=16, max_sequence_length=512)

    def __init__(self, dit: SD3DiT, text: SD3TextEncoder, vae, scheduler_spec: SchedulerSpec,
                 device: torch.device, dtype: torch.dtype):
        self.dit, self.text, self.vae = dit, text, vae
        self.scheduler_spec = scheduler_spec
        self.device, self.dtype = device, dtype
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusion3Pipeline:
        dit = load_sd3_dit(path / "transformer", device, dtype)
        with_t5 = _read_json(path / "model_index.json").get("text_encoder_3", [None])[0] is not None
        return cls(
            dit=dit,
            text=SD3TextEncoder.load(path, dit.cfg.joint_attention_dim, device, dtype, with_t5),
            vae=load_autoencoder_kl(path / "vae", device, dtype),
            scheduler_spec=_own_spacing(read_scheduler_config(path / "scheduler" / "scheduler_config.json")),
            device=device,
            dtype=dtype,
        )

    @classmethod
    def for_folder(cls, path: Path, defaults: RequestDefaults, limits: ModelLimits):
        """Default size = the transformer's sample_size in pixels (as diffusers); sizes up to what the
        learned position table covers; skip-layer guidance may name any of its blocks."""
        try:
            cfg = SD3Config.from_dict(_read_json(path / "transformer" / "config.json"))
            vae_scale = 2 ** (len(_read_json(path / "vae" / "config.json").get("block_out_channels", [64])) - 1)
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise InvalidRequest(f"{path}: {exc}", "model") from None
        side = cfg.sample_size * vae_scale
        max_side = min(cfg.max_latent_size * vae_scale, limits.max_size)
        return (replace(defaults, height=side, width=side),
                replace(limits, size_multiple=vae_scale * cfg.patch_size, max_size=max_side,
                        max_pixels=min(limits.max_pixels, max_side * max_side), guidance_layers=cfg.num_layers))

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        return (*super().batch_key(req), req.guidance_scale > 1, req.skip_guidance_layers,
                req.skip_layer_guidance_scale, req.skip_layer_guidance_start, req.skip_layer_guidance_stop)

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.dit, **self.text.models(), "vae": self.vae}

    def uses_negative_prompt(self, req: GenerationRequest) -> bool:
        """Classifier-free guidance (with "" when no negative prompt is given) when guidance_scale > 1."""
        return req.guidance_scale > 1

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> SD3Text:
        """Each request's prompt encoded once, then repeated for its images."""
        text = self.text(prompts, requests[0].max_sequence_length)
        return SD3Text(repeat_per_image(text.txt, requests), repeat_per_image(text.pooled, requests))

    def prepare_latents(self, requests: list[GenerationRequest]) -> SD3Latents:
        req = requests[0]
        shape = (self.dit.cfg.in_channels, req.height // self.vae_scale, req.width // self.vae_scale)
        return SD3Latents(initial_noise(requests, shape, self.device, self.dtype))

    def sampling(self, latents: SD3Latents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        p = self.dit.cfg.patch_size
        seq_len = (latents.x.shape[2] // p) * (latents.x.shape[3] // p)
        guidance = NoGuidance()
        if req.guidance_scale > 1:
            guidance = ClassifierFree(repeat_per_image(torch.tensor([r.guidance_scale for r in requests]), requests))
            if req.skip_guidance_layers is not None:
                steps = slg_steps(req.num_inference_steps, _or(req.skip_layer_guidance_start, SLG_START),
                                  _or(req.skip_layer_guidance_stop, SLG_STOP))
                guidance = SkipLayerGuidance(guidance, _or(req.skip_layer_guidance_scale, SLG_SCALE), steps)
        return Sampling(solver.schedule(req.num_inference_steps, seq_len), solver, guidance)

    def denoise(self, latents: SD3Latents, cond: SD3Text, uncond: SD3Text | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> SD3Latents:
        texts = {("cond",): cond, (SKIP,): cond}
        if uncond is not None:
            texts |= {("uncond",): uncond, ("cond", "uncond"): SD3Text(
                torch.cat([cond.txt, uncond.txt]), torch.cat([cond.pooled, uncond.pooled]))}
        skip = tuple(requests[0].skip_guidance_layers or ())

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            text = texts[ctx.branches]
            inp = SD3Inputs(x=x, txt=text.txt, pooled=text.pooled, timesteps=t)
            if ctx.branches == (SKIP,):
                return self.dit.forward_skipping(inp, skip)
            return self.dit(inp, ctx)

        return SD3Latents(denoise(latents.x, sampling, model, control, timer))

    def decode(self, latents: SD3Latents) -> Pixels:
        return Pixels(decode_kl(self.vae, latents.x))


def _or(value, default):
    return default if value is None else value


def _own_spacing(spec: SchedulerSpec) -> SchedulerSpec:
    """The SD3 pipeline passes no sigmas: Euler spaces them as the scheduler itself does."""
    if spec.euler is None:
        return spec
    return replace(spec, euler=replace(spec.euler, spacing="scheduler"))
