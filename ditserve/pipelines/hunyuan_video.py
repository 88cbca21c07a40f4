"""HunyuanVideo text-to-video: LLaMA (templated, cropped) + CLIP-L pooled text, a 3D causal VAE,
embedded guidance (guidance-distilled), true CFG with a negative prompt.

As diffusers' `HunyuanVideoPipeline`: noise [N, C, (F-1)/4+1, H/8, W/8] in float32 from the request's
generator; sigmas linspace(1, 0, N+1)[:-1] shifted by the folder's shift (7.0); the embedded
guidance is `guidance_scale` x 1000 in the DiT's dtype; the timestep enters in the latents' dtype;
true CFG only when a negative prompt is given and `true_cfg_scale` > 1; CLIP sees `prompt` (no `prompt_2`). Frame counts must be 4k + 1 (diffusers
floors other counts silently; here they are refused).

The DiT sees the text only up to the batch's longest prompt: the padding after it is masked out of
every attention anyway, so dropping it changes nothing but the work, and when no row is padded the
attention runs without a mask (the fast kernels). True CFG runs cond and uncond as one batch when
their prompts are as long, else as two unmasked calls. (A compiled DiT specialises per text length, as
with Qwen-Image's unpadded prompts: each new prompt length compiles again; not yet bucketed.)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ditserve.api import GenerationRequest, InvalidRequest, ModelLimits, RequestDefaults
from ditserve.encoders.hunyuan_video import LlamaPromptEncoder
from ditserve.encoders.text import ClipPooledEncoder
from ditserve.encoders.umt5 import component_class
from ditserve.models.common.dit import StepContext
from ditserve.models.hunyuan_video.model import HunyuanVideoDiT, HunyuanVideoInputs, pack, unpack
from ditserve.models.hunyuan_video.weights import load_hunyuan_video_dit
from ditserve.pipelines.base import Frames, Pipeline, RunControl, StageTimer
from ditserve.pipelines.denoise import Sampling, denoise
from ditserve.pipelines.stages import initial_noise, repeat_per_image
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.sampling.scheduler_config import SchedulerSpec, read_scheduler_config
from ditserve.vae.hunyuan_video import HunyuanLatentShape, decode_hunyuan_video, load_hunyuan_video_vae

log = logging.getLogger(__name__)

HUNYUAN_VIDEO_DEFAULTS = RequestDefaults(height=720, width=1280, num_inference_steps=50, guidance_scale=6.0,
                                         true_cfg_scale=1.0, max_sequence_length=256, num_frames=129, fps=24)


def refuse(req: GenerationRequest) -> None:
    """What the other limits cannot say (ModelLimits.refuse: at the edge, before any model work)."""
    if req.guidance_scale_2 is not None:
        raise InvalidRequest("guidance_scale_2 is for two-expert models (Wan 2.2 A14B); HunyuanVideo has one DiT",
                             "guidance_scale_2")


HUNYUAN_VIDEO_LIMITS = ModelLimits(size_multiple=16, max_sequence_length=256, frame_multiple=4, max_frames=257,
                                   max_num_images=4, max_pixels=1280 * 1280, refuse=refuse)


@dataclass
class HunyuanText:
    """LLaMA states [N, T, D] with their mask [N, T] and the CLIP pooled vector [N, P]; N = videos."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    @staticmethod
    def cat(a: HunyuanText, b: HunyuanText) -> HunyuanText:
        return HunyuanText(torch.cat([a.states, b.states]), torch.cat([a.mask, b.mask]),
                           torch.cat([a.pooled, b.pooled]))


@dataclass
class DiTText:
    """What the DiT gets of a batch's text: states [N, T', D] up to the last token of the longest prompt,
    their mask (None: no padding left), the pooled vector."""

    states: torch.Tensor
    mask: torch.Tensor | None
    pooled: torch.Tensor

    @classmethod
    def trimmed(cls, text: HunyuanText) -> DiTText:
        """Right padding that every row has is dropped (none is with a left-padding tokenizer)."""
        used = text.mask.bool().any(dim=0).nonzero()
        n = int(used.max()) + 1 if used.numel() else 1
        mask = text.mask[:, :n]
        return cls(text.states[:, :n], None if bool(mask.bool().all()) else mask, text.pooled)


@dataclass
class HunyuanLatents:
    """Packed latents [N, L, C·pt·p·p] on the token grid (f, h, w)."""

    x: torch.Tensor
    grid: tuple[int, int, int]


class HunyuanVideoPipeline(Pipeline):
    defaults = HUNYUAN_VIDEO_DEFAULTS
    limits = HUNYUAN_VIDEO_LIMITS

    def __init__(self, dit: HunyuanVideoDiT, llama: LlamaPromptEncoder, clip: ClipPooledEncoder, vae,
                 scheduler_spec: SchedulerSpec, device: torch.device, dtype: torch.dtype):
        self.dit, self.llama, self.clip, self.vae = dit, llama, clip, vae
        self.scheduler_spec = scheduler_spec
        self.device, self.dtype = device, dtype
        self.shape = HunyuanLatentShape.from_config(dict(vae.config))

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> HunyuanVideoPipeline:
        index = json.loads((path / "model_index.json").read_text())
        llama = LlamaPromptEncoder.load(path / "text_encoder", path / "tokenizer", device, dtype,
                                        tokenizer_cls=component_class(index, "tokenizer", "LlamaTokenizerFast"),
                                        model_cls=component_class(index, "text_encoder", "LlamaModel"))
        return cls(
            dit=load_hunyuan_video_dit(path / "transformer", device, dtype),
            llama=llama,
            clip=ClipPooledEncoder.load(path / "text_encoder_2", path / "tokenizer_2", device, dtype),
            vae=load_hunyuan_video_vae(path / "vae", device, torch.float32 if device.type == "cpu" else dtype),
            scheduler_spec=read_scheduler_config(path / "scheduler" / "scheduler_config.json"),
            device=device, dtype=dtype,
        )

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.dit, "text_encoder": self.llama.model, "text_encoder_2": self.clip.model,
                "vae": self.vae}

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> HunyuanText:
        """Each request's prompt encoded once (LLaMA and CLIP both see it), repeated for its videos."""
        text = self.llama(prompts, requests[0].max_sequence_length)
        pooled = self.clip(prompts)
        return HunyuanText(repeat_per_image(text.states.to(self.dtype), requests),
                           repeat_per_image(text.mask, requests), repeat_per_image(pooled.to(self.dtype), requests))

    def prepare_latents(self, requests: list[GenerationRequest]) -> HunyuanLatents:
        req = requests[0]
        noise = initial_noise(requests, self.shape.latents(req.num_frames, req.height, req.width), self.device,
                              torch.float32)
        return HunyuanLatents(pack(noise, self.dit.cfg.patch), self.dit.grid(noise.shape))

    def sampling(self, latents: HunyuanLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        guidance = NoGuidance()
        if req.do_true_cfg:
            # one batch when cond and uncond need no mask (decided in `denoise`, which knows the texts)
            guidance = ClassifierFree(repeat_per_image(torch.tensor([r.true_cfg_scale for r in requests]), requests))
        return Sampling(solver.schedule(req.num_inference_steps, latents.x.shape[1]), solver, guidance)

    def denoise(self, latents: HunyuanLatents, cond: HunyuanText, uncond: HunyuanText | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> HunyuanLatents:
        scales = torch.tensor([r.guidance_scale for r in requests], dtype=self.dtype)
        embedded = repeat_per_image(scales * 1000.0, requests).to(self.device)
        texts = {("cond",): DiTText.trimmed(cond)}
        if uncond is not None:
            texts |= {("uncond",): DiTText.trimmed(uncond),
                      ("cond", "uncond"): DiTText.trimmed(HunyuanText.cat(cond, uncond))}
            if isinstance(sampling.guidance, ClassifierFree) and texts[("cond", "uncond")].mask is not None:
                sampling = replace(sampling, guidance=replace(sampling.guidance, batched=False))
        ropes = {n: self.dit.positional_tables(latents.grid, n, self.device)
                 for n in {text.states.shape[1] for text in texts.values()}}

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            text = texts[ctx.branches]
            inp = HunyuanVideoInputs(img=x.to(self.dtype), grid=latents.grid, timesteps=t.to(x.dtype),
                                     txt=text.states, pooled=text.pooled, txt_mask=text.mask,
                                     guidance=embedded.repeat(len(ctx.branches)), rope=ropes[text.states.shape[1]])
            return self.dit(inp, ctx)

        return HunyuanLatents(denoise(latents.x, sampling, model, control, timer), latents.grid)

    def decode(self, latents: HunyuanLatents) -> Frames:
        x = unpack(latents.x, latents.grid, self.dit.cfg.patch)
        return Frames(decode_hunyuan_video(self.vae, x, self.shape, tiled=self.device.type == "cuda"))
