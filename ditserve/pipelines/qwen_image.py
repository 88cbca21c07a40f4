"""Qwen-Image text-to-image: Qwen2.5-VL text, packed 2x2 latents of a 16-channel 3D VAE, MSRoPE,
true CFG with diffusers' norm-preserving rescale (cond and uncond as one batch, padded text masked).

The edit pipelines (qwen_image_edit.py) extend this one with input-image latents joined to the
image sequence and images in the prompt.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from ditserve.api import GenerationRequest, InvalidRequest, ModelLimits, RequestDefaults
from ditserve.encoders.qwen import T2I_TEMPLATE, PromptEmbeds, PromptTemplate, QwenPromptEncoder
from ditserve.models.common.dit import StepContext
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT, QwenImageInputs
from ditserve.models.qwen_image.weights import load_qwen_image_dit
from ditserve.pipelines.base import Pipeline, Pixels, RunControl, StageTimer
from ditserve.pipelines.denoise import Sampling, denoise
from ditserve.pipelines.stages import initial_noise, latent_grid, pack, repeat_per_image, unpack
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.sampling.scheduler_config import SchedulerSpec, read_scheduler_config
from ditserve.vae.qwen import decode_qwen, load_qwen_vae, spatial_scale

log = logging.getLogger(__name__)


@dataclass
class QwenLatents:
    """Packed noise latents [N, frames * L, 4C]: `frames` images (Qwen-Image-Layered: the
    composite, then its layers; otherwise 1) on an (h, w) latent grid, frame after frame; for
    editing, the input images' packed latents [N, Lc, 4C] and their latent grids, joined after x in
    the DiT's image sequence."""

    x: torch.Tensor
    grid: tuple[int, int]
    cond: torch.Tensor | None = None
    cond_grids: tuple[tuple[int, int], ...] = field(default=())
    frames: int = 1

    def patch_grids(self) -> list[tuple[int, int]]:
        return [(h // 2, w // 2) for h, w in ((self.grid,) * self.frames + self.cond_grids)]


def joint_text(cond: PromptEmbeds, uncond: PromptEmbeds | None) -> PromptEmbeds:
    """cond (and uncond) as one batch, zero-padded to one length; the mask marks real tokens."""
    parts = [cond] if uncond is None else [cond, uncond]
    longest = max(p.txt.shape[1] for p in parts)
    txt = torch.cat([torch.nn.functional.pad(p.txt, (0, 0, 0, longest - p.txt.shape[1])) for p in parts])
    mask = torch.cat([torch.nn.functional.pad(p.mask, (0, longest - p.mask.shape[1])) for p in parts])
    return PromptEmbeds(txt, mask)


class QwenImagePipeline(Pipeline):
    defaults = RequestDefaults(height=1024, width=1024, num_inference_steps=50, guidance_scale=1.0,
                               true_cfg_scale=4.0, max_sequence_length=512)
    limits = ModelLimits(size_multiple=16, max_sequence_length=1024)
    template: ClassVar[PromptTemplate] = T2I_TEMPLATE
    truncate_text: ClassVar[bool] = True  # to max_sequence_length; the edit pipelines keep all tokens
    vision_prompt: ClassVar[bool] = False  # input images in the prompt (the edit pipelines)
    # the additional timestep embedding's row: only Qwen-Image-Layered's pipeline passes one
    passes_t_cond: ClassVar[bool] = False
    image_channels: ClassVar[int] = 3  # what the VAE encodes and decodes (Qwen-Image-Layered: RGBA)

    def __init__(self, dit: QwenImageDiT, text: QwenPromptEncoder, vae, scheduler_spec: SchedulerSpec,
                 device: torch.device, dtype: torch.dtype):
        self.dit, self.text, self.vae = dit, text, vae
        self.scheduler_spec = scheduler_spec
        self.device, self.dtype = device, dtype
        self.vae_scale = spatial_scale(vae)
        self.latent_channels = vae.config.z_dim

    @classmethod
    def for_folder(cls, path: Path, defaults: RequestDefaults, limits: ModelLimits):
        """The transformer config read strictly, and checked against the VAE's, before any weights
        load: a key we do not run, or one this pipeline does not drive (as in diffusers), is refused
        in one line."""
        file, vae_file = path / "transformer" / "config.json", path / "vae" / "config.json"
        try:
            cfg = QwenImageConfig.from_json(file)
            vae = json.loads(vae_file.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"{file}: {exc}", "model") from None
        if cfg.use_additional_t_cond and not cls.passes_t_cond:
            raise InvalidRequest(f"{file}: use_additional_t_cond=True needs the layered pipeline "
                                 f"(QwenImageLayeredPipeline); {cls.__name__} passes no additional_t_cond", "model")
        z_dim, channels = vae.get("z_dim", 16), vae.get("input_channels", 3)
        if channels != cls.image_channels:
            raise InvalidRequest(f"{vae_file}: input_channels={channels}, but {cls.__name__} gives the VAE "
                                 f"{cls.image_channels}-channel images", "model")
        if cfg.in_channels != 4 * z_dim or (cfg.out_channels or cfg.in_channels) != z_dim:
            raise InvalidRequest(f"{file}: in_channels={cfg.in_channels}, out_channels={cfg.out_channels} do not "
                                 f"fit the VAE's z_dim={z_dim} in 2x2 patches", "model")
        return defaults, limits

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "QwenImagePipeline":
        processor = path / "processor" if cls.vision_prompt else None
        return cls(
            dit=load_qwen_image_dit(path / "transformer", device, dtype),
            text=QwenPromptEncoder.load(path / "text_encoder", path / "tokenizer", device, dtype, processor,
                                        text_only=not (cls.vision_prompt or cls.limits.captions)),
            vae=load_qwen_vae(path / "vae", device, dtype),
            scheduler_spec=read_scheduler_config(path / "scheduler" / "scheduler_config.json"),
            device=device,
            dtype=dtype,
        )

    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.dit, "text_encoder": self.text.model, "vae": self.vae}

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
        h, w = latent_grid(requests[0].height, requests[0].width, self.vae_scale)
        noise = initial_noise(requests, (1, self.latent_channels, h, w), self.device, self.dtype)
        return QwenLatents(pack(noise[:, 0]), (h, w))

    def sampling(self, latents: QwenLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        guidance = NoGuidance()
        if req.do_true_cfg:
            scales = repeat_per_image(torch.tensor([r.true_cfg_scale for r in requests]), requests)
            guidance = ClassifierFree(scales, rescale="norm")
        return Sampling(solver.schedule(req.num_inference_steps, latents.x.shape[1]), solver, guidance)

    def denoise(self, latents: QwenLatents, cond: PromptEmbeds, uncond: PromptEmbeds | None, sampling: Sampling,
                requests: list[GenerationRequest], control: RunControl, timer: StageTimer) -> QwenLatents:
        grids = latents.patch_grids()
        texts = {("cond",): cond}
        if uncond is not None:
            texts |= {("uncond",): uncond, ("cond", "uncond"): joint_text(cond, uncond)}
        inputs = {branches: self._text_inputs(text, grids) for branches, text in texts.items()}
        target_len = self.target_len(latents)

        def model(expert: int, x: torch.Tensor, t: torch.Tensor, ctx: StepContext) -> torch.Tensor:
            txt, mask, img_ids, txt_ids, rope = inputs[ctx.branches]
            img = x if latents.cond is None else torch.cat([x, latents.cond.repeat(len(ctx.branches), 1, 1)], dim=1)
            inp = QwenImageInputs(img=img, txt=txt, timesteps=t.to(x.dtype) / 1000, img_ids=img_ids,
                                  txt_ids=txt_ids, txt_mask=mask, rope=rope, target_len=target_len)
            return self.dit(inp, ctx)[:, : x.shape[1]]

        return replace(latents, x=denoise(latents.x, sampling, model, control, timer))

    def target_len(self, latents: QwenLatents) -> int:
        """Image tokens of the first grid (the image being generated); those after it are input
        images (modulated at timestep 0 by zero_cond_t checkpoints)."""
        return latents.x.shape[1]

    def _text_inputs(self, text: PromptEmbeds, grids) -> tuple:
        """Text tokens, key mask (None when nothing is padding), image and text positions (float32:
        bf16 cannot hold text positions past 256 exactly) and the rotary table."""
        mask = None if bool(text.mask.all()) else text.mask
        img_ids, txt_ids = self.dit.positions(grids, text.txt.shape[1], self.device)
        return text.txt, mask, img_ids, txt_ids, self.dit.positional_tables(img_ids, txt_ids)

    def decode(self, latents: QwenLatents) -> Pixels:
        return Pixels(decode_qwen(self.vae, unpack(latents.x, latents.grid)))
