"""Wan 2.1 / 2.2 video: UMT5 text, a causal video VAE, one DiT or two experts (A14B), CFG.

- `WanPipeline`: text-to-video (2.1 T2V; 2.2 T2V-A14B with `transformer_2`, `boundary_ratio`,
  `guidance_scale_2`); a TI2V-5B folder (`expand_timesteps`) also animates an input image: its
  encoded first frame replaces latent frame 0 at every step, with timestep 0 for those tokens.
- `WanImageToVideoPipeline`: 2.1 I2V (CLIP image tokens in cross-attention) and 2.2 I2V-A14B; the
  input image, resized to the video size, is encoded as the first frame of a latent condition that
  (with a frame mask) is concatenated to the noisy latents' channels.

As in diffusers: noise and latents in float32, the model called in its dtype, CFG when guidance > 1
(negative prompt "" by default), cond and uncond here batched into one call.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from ditserve.api import GenerationRequest, ModelLimits, RequestDefaults
from ditserve.encoders.umt5 import UMT5Encoder
from ditserve.models.common.dit import StepContext
from ditserve.models.wan.model import WanDiT, WanInputs
from ditserve.models.wan.weights import load_wan_dit
from ditserve.pipelines.base import Frames, Pipeline, RunControl, StageTimer
from ditserve.pipelines.denoise import Experts, Sampling, denoise
from ditserve.pipelines.stages import initial_noise, repeat_per_image
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.sampling.scheduler_config import SchedulerSpec, read_scheduler_config
from ditserve.vae.kl import image_to_tensor
from ditserve.vae.wan import VideoLatentShape, decode_wan, encode_wan, load_wan_vae

log = logging.getLogger(__name__)

WAN_DEFAULTS = RequestDefaults(height=480, width=832, num_inference_steps=50, guidance_scale=5.0,
                               max_sequence_length=512, num_frames=81, fps=16)
WAN_LIMITS = ModelLimits(size_multiple=16, max_sequence_length=512, frame_multiple=4, max_frames=257,
                         max_num_images=4, max_pixels=1280 * 1280)


@dataclass
class WanText:
    """UMT5 states [N, T, D] (one row per video) for the prompts, and for the negative prompts."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None


@dataclass
class WanLatents:
    """Noisy latents [N, C, f, h, w] (float32); for image-to-video the condition: channel-concatenated
    mask + latents (2.1/2.2 I2V), or the first-frame latents with their frame mask (TI2V)."""

    x: torch.Tensor
    concat: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None


class WanPipeline(Pipeline):
    defaults: ClassVar[RequestDefaults] = WAN_DEFAULTS
    limits: ClassVar[ModelLimits] = WAN_LIMITS
    dit_names = ("dit", "dit_2")

    def __init__(self, dit: WanDiT | None, dit_2: WanDiT | None, text: UMT5Encoder, vae, scheduler_spec: SchedulerSpec,
                 boundary_ratio: float | None, expand_timesteps: bool, device: torch.device, dtype: torch.dtype,
                 image_encoder=None, num_train_timesteps: int = 1000):
        self.dit, self.dit_2, self.text, self.vae = dit, dit_2, text, vae
        self.image_encoder = image_encoder
        self.scheduler_spec = scheduler_spec
        self.boundary_ratio, self.expand_timesteps = boundary_ratio, expand_timesteps
        self.num_train_timesteps = num_train_timesteps
        self.device, self.dtype = device, dtype
        self.shape = VideoLatentShape.of(vae)

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "WanPipeline":
        index = json.loads((path / "model_index.json").read_text())
        scheduler_file = path / "scheduler" / "scheduler_config.json"
        present = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
        image_encoder = None
        if "image_encoder" in present:
            from ditserve.encoders.clip_vision import ClipImageEncoder

            image_encoder = ClipImageEncoder.load(path / "image_encoder", path / "image_processor", device, dtype)
        return cls(
            dit=load_wan_dit(path / "transformer", device, dtype) if "transformer" in present else None,
            dit_2=load_wan_dit(path / "transformer_2", device, dtype) if "transformer_2" in present else None,
            text=UMT5Encoder.load(path / "text_encoder", path / "tokenizer", device, dtype),
            vae=load_wan_vae(path / "vae", device, torch.float32 if device.type == "cpu" else dtype),
            scheduler_spec=read_scheduler_config(scheduler_file),
            boundary_ratio=index.get("boundary_ratio"), expand_timesteps=bool(index.get("expand_timesteps")),
            device=device, dtype=dtype, image_encoder=image_encoder,
            num_train_timesteps=json.loads(scheduler_file.read_text()).get("num_train_timesteps", 1000),
        )

    @classmethod
    def for_folder(cls, path: Path, defaults: RequestDefaults, limits: ModelLimits):
        """TI2V-5B folders (`expand_timesteps`): 24 fps, an optional input image, sizes in multiples of
        32 (16x VAE, 2x2 patches)."""
        index = json.loads((path / "model_index.json").read_text())
        if not index.get("expand_timesteps"):
            return defaults, limits
        return replace(defaults, fps=24), replace(limits, size_multiple=32, max_images=max(limits.max_images, 1))

    def components(self) -> dict[str, torch.nn.Module]:
        parts = {"transformer": self.dit, "transformer_2": self.dit_2, "text_encoder": self.text.model,
                 "vae": self.vae, "image_encoder": getattr(self.image_encoder, "model", None)}
        return {k: v for k, v in parts.items() if v is not None}

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        """Video requests batch when size, frames, steps, CFG on/off, solver and input-image use agree."""
        return (req.height, req.width, req.num_frames, req.num_inference_steps, req.guidance_scale > 1,
                req.max_sequence_length, req.sampler, req.flow_shift, bool(req.images))

    def uses_negative_prompt(self, req: GenerationRequest) -> bool:
        return req.guidance_scale > 1  # as diffusers: CFG on, negative prompt "" unless given

    @property
    def experts(self) -> list[WanDiT]:
        return [d for d in (self.dit, self.dit_2) if d is not None]

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> torch.Tensor:
        states = self.text(prompts, requests[0].max_sequence_length)
        return repeat_per_image(states.to(self.dtype), requests)

    def prepare_latents(self, requests: list[GenerationRequest]) -> WanLatents:
        req = requests[0]
        shape = self.shape.latents(req.num_frames, req.height, req.width)
        x = initial_noise(requests, shape, self.device, torch.float32)
        if not req.images:
            return WanLatents(x)
        return self.image_condition(WanLatents(x), requests)

    def image_condition(self, latents: WanLatents, requests: list[GenerationRequest]) -> WanLatents:
        """TI2V: the input image's latents replace frame 0 (see `model_input`)."""
        if not self.expand_timesteps:
            raise ValueError("this Wan text-to-video folder takes no input image")  # refused earlier by limits
        first = torch.cat([self._encode_frames(r, 1) for r in requests])
        mask = torch.ones_like(latents.x[:1, :1])
        mask[:, :, 0] = 0
        return WanLatents(latents.x, first_frame=repeat_per_image(first, requests), frame_mask=mask)

    def _encode_frames(self, req: GenerationRequest, num_frames: int) -> torch.Tensor:
        """The request's image resized to the video size (Lanczos, as diffusers) as frame 0 of a
        `num_frames` clip (the rest zeros), encoded to normalised float32 latents."""
        pixels = image_to_tensor(req.images[-1], req.width, req.height)[:, :, None]  # [1, 3, 1, H, W]
        if num_frames > 1:
            pixels = torch.cat([pixels, pixels.new_zeros(1, 3, num_frames - 1, req.height, req.width)], dim=2)
        return encode_wan(self.vae, pixels.to(self.device))

    def sampling(self, latents: WanLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        sched = solver.schedule(req.num_inference_steps, latents.x[0, 0].numel())
        experts = Experts()
        if self.boundary_ratio is not None and self.dit_2 is not None:
            experts = Experts(self.boundary_ratio * self.num_train_timesteps)
        guidance = NoGuidance()
        if req.guidance_scale > 1:
            scale = repeat_per_image(torch.tensor([r.guidance_scale for r in requests]), requests)
            scale_2 = repeat_per_image(torch.tensor([r.guidance_scale if r.guidance_scale_2 is None
                                                     else r.guidance_scale_2 for r in requests]), requests)
            guidance = ClassifierFree(scale, scale_2)
        return Sampling(sched, solver, guidance, experts)

    def model_input(self, x: torch.Tensor, latents: WanLatents, repeat: int) -> torch.Tensor:
        """What the DiT sees of the noisy latents: with the I2V condition concatenated on channels, or
        with frame 0 replaced by the input image (TI2V)."""
        if latents.concat is not None:
            x = torch.cat([x, latents.concat.repeat(repeat, 1, 1, 1, 1)], dim=1)
        elif latents.first_frame is not None:
            first = latents.first_frame.repeat(repeat, 1, 1, 1, 1)
            x = (1 - latents.frame_mask) * first + latents.frame_mask * x
        return x.to(self.dtype)

    def timesteps_for(self, t: torch.Tensor, latents: WanLatents, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B] timesteps, or per token [B, L] for TI2V (0 on the tokens of a given first frame)."""
        if not self.expand_timesteps:
            return t
        f, h, w = grid
        per_token = torch.ones(f, h, w, device=t.device)
        if latents.frame_mask is not None:
            per_token = latents.frame_mask[0, 0, :, ::2, ::2].to(t.device)
        return per_token.flatten()[None] * t[:, None]

    def denoise(self, latents: WanLatents, cond: torch.Tensor, uncond: torch.Tensor | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> WanLatents:
        texts = {("cond",): cond}
        if uncond is not None:
            texts |= {("uncond",): uncond, ("cond", "uncond"): torch.cat([cond, uncond])}
        experts = self.experts
        grid = experts[0].grid(latents.x.shape)
        rope = experts[0].positional_tables(grid, self.device)

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            n = len(ctx.branches)
            image = None if latents.image_tokens is None else latents.image_tokens.repeat(n, 1, 1)
            inp = WanInputs(self.model_input(x, latents, n), self.timesteps_for(t, latents, grid),
                            texts[ctx.branches], image, rope)
            return experts[expert](inp, ctx).float()

        x = denoise(latents.x, sampling, model, control, timer)
        if latents.first_frame is not None:
            x = (1 - latents.frame_mask) * latents.first_frame + latents.frame_mask * x
        return WanLatents(x)

    def decode(self, latents: WanLatents) -> Frames:
        return Frames(decode_wan(self.vae, latents.x))


class WanImageToVideoPipeline(WanPipeline):
    limits = ModelLimits(size_multiple=16, max_sequence_length=512, frame_multiple=4, max_frames=257,
                         max_num_images=4, max_pixels=1280 * 1280, min_images=1, max_images=1)

    def image_condition(self, latents: WanLatents, requests: list[GenerationRequest]) -> WanLatents:
        """The image as frame 0 of a zero clip, encoded, behind a mask of the frames it fixes (the
        first latent frame's 4 video frames); CLIP image tokens when the folder has the encoder."""
        if self.expand_timesteps:
            return super().image_condition(latents, requests)
        req = requests[0]
        cond = torch.cat([self._encode_frames(r, req.num_frames) for r in requests])
        f, h, w = latents.x.shape[2:]
        t = self.shape.temporal
        mask = torch.zeros(1, t * (f - 1) + t, h, w, device=self.device)  # frame 0 repeated t times, then 1..
        mask[:, :t] = 1
        mask = mask.view(1, f, t, h, w).transpose(1, 2)  # [1, t, f, h, w]
        concat = torch.cat([mask.expand(cond.shape[0], -1, -1, -1, -1), cond], dim=1)
        tokens = None
        if self.image_encoder is not None:
            tokens = torch.cat([self.image_encoder([r.images[-1]]) for r in requests]).to(self.dtype)
            tokens = repeat_per_image(tokens, requests)
        return WanLatents(latents.x, concat=repeat_per_image(concat, requests), image_tokens=tokens)
