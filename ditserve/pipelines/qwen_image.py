"""Qwen-Image text-to-image: Qwen2.5-VL text, packed 2x2 latents of a 16-channel 3D VAE, MSRoPE,
true CFG with diffusers' norm-preserving rescale (cond and uncond as one batch, padded text masked).

The edit pipelines (qwen_image_edit.py) extend this one with input-image latents joined to the
image sequence and images in the prompt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ditserve.api import GenerationRequest, ModelLimits, RequestDefaults
from ditserve.encoders.qwen import T2I_TEMPLATE, PromptEmbeds, PromptTemplate, QwenPromptEncoder
from ditserve.models.qwen_image.model import QwenImageDiT, QwenImageInputs, image_ids, text_ids
from ditserve.models.qwen_image.weights import load_qwen_image_dit
from ditserve.pipelines.base import Pipeline, Pixels, RunControl, StageTimer
from ditserve.pipelines.stages import denoise, initial_noise, pack, repeat_per_image, unpack
from ditserve.sampling.flow_match import FlowMatchConfig, Schedule, schedule
from ditserve.sampling.guidance import norm_preserving_cfg
from ditserve.vae.qwen import decode_qwen, load_qwen_vae, spatial_scale

log = logging.getLogger(__name__)


@dataclass
class QwenLatents:
    """Packed noise latents [N, L, 4C] on an (h, w) latent grid; for editing, the input images'
    packed latents [N, Lc, 4C] and their latent grids, joined after x in the DiT's image sequence."""

    x: torch.Tensor
    grid: tuple[int, int]
    cond: torch.Tensor | None = None
    cond_grids: tuple[tuple[int, int], ...] = field(default=())

    def patch_grids(self) -> list[tuple[int, int]]:
        return [(h // 2, w // 2) for h, w in (self.grid, *self.cond_grids)]


def joint_text(cond: PromptEmbeds, uncond: PromptEmbeds | None) -> PromptEmbeds:
    """cond (and uncond) as one batch, zero-padded to one length; the mask marks real tokens."""
    parts = [cond] if uncond is None else [cond, uncond]
    longest = max(p.txt.shape[1] for p in parts)
    txt = torch.cat([torch.nn.functional.pad(p.txt, (0, 0, 0, longest - p.txt.shape[1])) for p in parts])
    mask = torch.cat([torch.nn.functional.pad(p.mask, (0, longest - p.mask.shape[1])) for p in parts])
    return PromptEmbeds(txt, mask)


class QwenImagePipeline(Pipeline):
    class_names = ("QwenImagePipeline",)
    defaults = RequestDefaults(height=1024, width=1024, num_inference_steps=50, guidance_scale=1.0,
                               true_cfg_scale=4.0, max_sequence_length=512)
    limits = ModelLimits(size_multiple=16, max_sequence_length=1024)
    template: ClassVar[PromptTemplate] = T2I_TEMPLATE
    truncate_text: ClassVar[bool] = True  # to max_sequence_length; the edit pipelines keep all tokens

    def __init__(self, dit: QwenImageDiT, text: QwenPromptEncoder, vae, scheduler: FlowMatchConfig,
                 device: torch.device, dtype: torch.dtype):
        self.dit, self.text, self.vae = dit, text, vae
        self.scheduler = scheduler
        self.device, self.dtype = device, dtype
        self.vae_scale = spatial_scale(vae)
        self.latent_channels = vae.config.z_dim

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "QwenImagePipeline":
        processor = path / "processor" if cls.limits.max_images else None
        return cls(
            dit=load_qwen_image_dit(path / "transformer", device, dtype),
            text=QwenPromptEncoder.load(path / "text_encoder", path / "tokenizer", device, dtype, processor),
            vae=load_qwen_vae(path / "vae", device, dtype),
            scheduler=FlowMatchConfig.from_json(path / "scheduler" / "scheduler_config.json"),
            device=device,
            dtype=dtype,
        )

    # -- stages ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], requests: list[GenerationRequest]) -> PromptEmbeds:
        """Each request's prompt encoded once, then repeated for its images."""
        emb = self.text(prompts, self.template, self.prompt_images(requests))
        if self.truncate_text:
            limit = requests[0].max_sequence_length
            if emb.txt.shape[1] > limit:
                log.warning("prompt truncated to max_sequence_length=%d tokens", limit)
            emb = PromptEmbeds(emb.txt[:, :limit], emb.mask[:, :limit])
        return PromptEmbeds(repeat_per_image(emb.txt.to(self.dtype), requests), repeat_per_image(emb.mask, requests))

    def prompt_images(self, requests: list[GenerationRequest]) -> list | None:
        """The images the text encoder sees with each prompt (none for text-to-image)."""
        return None

    def prepare_latents(self, requests: list[GenerationRequest]) -> QwenLatents:
        req = requests[0]
        h = 2 * (req.height // (self.vae_scale * 2))
        w = 2 * (req.width // (self.vae_scale * 2))
        noise = initial_noise(requests, (1, self.latent_channels, h, w), self.device, self.dtype)
        return QwenLatents(pack(noise[:, 0]), (h, w))

    def timesteps(self, latents: QwenLatents, num_steps: int) -> Schedule:
        return schedule(num_steps, latents.x.shape[1], self.scheduler)

    def denoise(self, latents: QwenLatents, cond: PromptEmbeds, uncond: PromptEmbeds | None, sched: Schedule,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> QwenLatents:
        n, grids = latents.x.shape[0], latents.patch_grids()
        text = joint_text(cond, uncond)
        mask = None if bool(text.mask.all()) else text.mask
        # float32 positions: bf16 cannot hold text positions past 256 exactly
        img_ids, txt_ids = image_ids(grids, self.device), text_ids(grids, text.txt.shape[1], self.device)
        pe = self.dit.positional_tables(img_ids, txt_ids, mask)
        if uncond is not None:
            cfg_scale = repeat_per_image(torch.tensor([r.true_cfg_scale for r in requests]), requests)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            img = x if latents.cond is None else torch.cat([x, latents.cond], dim=1)
            if uncond is not None:
                img, t = torch.cat([img, img]), torch.cat([t, t])
            v = self.dit(QwenImageInputs(img=img, txt=text.txt, timesteps=t, img_ids=img_ids, txt_ids=txt_ids,
                                         txt_mask=mask), pe)[:, : x.shape[1]]
            if uncond is not None:
                v_cond, v_uncond = v.split(n)
                v = norm_preserving_cfg(v_cond, v_uncond, cfg_scale.to(v.device))
            return v

        with torch.no_grad():
            x = denoise(latents.x, sched, predict, control, timer)
        return QwenLatents(x, latents.grid, latents.cond, latents.cond_grids)

    def decode(self, latents: QwenLatents) -> Pixels:
        return Pixels(decode_qwen(self.vae, unpack(latents.x, latents.grid)))
