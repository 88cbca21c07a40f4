"""FLUX.1 (dev and schnell): CLIP + T5 text, packed 2x2 latents, embedded guidance or true CFG."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ditserve.api import GenerationRequest, ModelLimits, RequestDefaults
from ditserve.encoders.text import ClipPooledEncoder, T5SequenceEncoder
from ditserve.models.common.dit import StepContext
from ditserve.models.flux.model import FluxDiT, FluxInputs
from ditserve.models.flux.weights import load_flux_dit
from ditserve.pipelines.base import Pipeline, Pixels, RunControl, StageTimer
from ditserve.pipelines.denoise import Sampling, denoise
from ditserve.pipelines.stages import initial_noise, latent_grid, pack, repeat_per_image, unpack
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.sampling.scheduler_config import SchedulerSpec, read_scheduler_config
from ditserve.vae.kl import decode_kl, load_autoencoder_kl

log = logging.getLogger(__name__)


@dataclass
class FluxText:
    """T5 tokens [N, T, Dt], CLIP pooled vector [N, P] and text positions [T, 3]; N = images."""

    txt: torch.Tensor
    pooled: torch.Tensor
    txt_ids: torch.Tensor


@dataclass
class FluxLatents:
    """Packed latents [N, (h/2)(w/2), 4C] on an (h, w) latent grid, and image positions [L, 3]."""

    x: torch.Tensor
    img_ids: torch.Tensor
    grid: tuple[int, int]


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """Positions (0, row, col) of each 2x2 latent patch."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] += torch.arange(h2)[:, None]
    ids[..., 2] += torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxPipeline(Pipeline):
    defaults = RequestDefaults(height=1024, width=1024, num_inference_steps=28,
                               guidance_scale=3.5, true_cfg_scale=1.0, max_sequence_length=512)
    limits = ModelLimits(size_multiple=16, max_sequence_length=512)

    def __init__(self, dit: FluxDiT, clip: ClipPooledEncoder, t5: T5SequenceEncoder, vae,
                 scheduler_spec: SchedulerSpec, device: torch.device, dtype: torch.dtype):
        self.dit, self.clip, self.t5, self.vae = dit, clip, t5, vae
        self.scheduler_spec = scheduler_spec
        self.device, self.dtype = device, dtype
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = dit.cfg.in_channels // 4

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "FluxPipeline":
        return cls(
            dit=load_flux_dit(path / "transformer", device, dtype),
            clip=ClipPooledEncoder.load(path / "text_encoder", path / "tokenizer", device, dtype),
            t5=T5SequenceEncoder.load(path / "text_encoder_2", path / "tokenizer_2", device, dtype),
            vae=load_autoencoder_kl(path / "vae", device, dtype),
            scheduler_spec=read_scheduler_config(path / "scheduler" / "scheduler_config.json"),
            device=device,
            dtype=dtype,
        )

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.dit, "text_encoder": self.clip.model, "text_encoder_2": self.t5.model,
                "vae": self.vae}

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> FluxText:
        """Each request's prompt encoded once, then repeated for its images."""
        pooled = self.clip(prompts)
        txt = self.t5(prompts, requests[0].max_sequence_length)
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device, dtype=txt.dtype)
        return FluxText(repeat_per_image(txt, requests), repeat_per_image(pooled, requests), txt_ids)

    def prepare_latents(self, requests: list[GenerationRequest]) -> FluxLatents:
        h, w = latent_grid(requests[0].height, requests[0].width, self.vae_scale)
        noise = initial_noise(requests, (self.latent_channels, h, w), self.device, self.dtype)
        return FluxLatents(pack(noise), image_ids(h // 2, w // 2, self.device, self.dtype), (h, w))

    def sampling(self, latents: FluxLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        guidance = NoGuidance()
        if req.do_true_cfg:
            guidance = ClassifierFree(repeat_per_image(torch.tensor([r.true_cfg_scale for r in requests]), requests))
        return Sampling(solver.schedule(req.num_inference_steps, latents.x.shape[1]), solver, guidance)

    def denoise(self, latents: FluxLatents, cond: FluxText, uncond: FluxText | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> FluxLatents:
        embedded = None
        if self.dit.cfg.guidance_embeds:
            scales = torch.tensor([r.guidance_scale for r in requests], dtype=torch.float32)
            embedded = repeat_per_image(scales, requests).to(self.device)
        texts = {("cond",): cond}
        if uncond is not None:
            texts |= {("uncond",): uncond, ("cond", "uncond"): FluxText(
                torch.cat([cond.txt, uncond.txt]), torch.cat([cond.pooled, uncond.pooled]), cond.txt_ids)}
        rope = self.dit.positional_tables(latents.img_ids, cond.txt_ids)

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            text = texts[ctx.branches]
            guidance = None if embedded is None else embedded.repeat(len(ctx.branches))
            inp = FluxInputs(img=x, txt=text.txt, pooled=text.pooled, timesteps=t.to(x.dtype) / 1000,
                             img_ids=latents.img_ids, txt_ids=cond.txt_ids, guidance=guidance, rope=rope)
            return self.dit(inp, ctx)

        x = denoise(latents.x, sampling, model, control, timer)
        return FluxLatents(x, latents.img_ids, latents.grid)

    def decode(self, latents: FluxLatents) -> Pixels:
        return Pixels(decode_kl(self.vae, unpack(latents.x, latents.grid)))
