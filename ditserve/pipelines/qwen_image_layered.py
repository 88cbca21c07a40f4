"""Qwen-Image-Layered (`QwenImageLayeredPipeline`): one RGBA image in, `layers` RGBA layers out.

As diffusers' pipeline runs it:
- the input image (RGBA; an RGB one gets an opaque alpha) is resized to the output size — by
  default its aspect ratio at about 640² pixels, diffusers' `resolution=640` bucket (give a size
  for another, e.g. the 1024 bucket) — and encoded by the 4-channel VAE;
- the prompt goes through Qwen-Image's text-to-image template (no image in it); a prompt of "" or
  " " is first replaced by Qwen2.5-VL's caption of the (resized) input image, written for diffusers'
  Chinese captioning prompt (its default, `use_en_prompt=False`; the English one is not exposed);
- noise for `layers + 1` frames (the composite, then each layer) is packed frame after frame and
  followed by the input image's latents; the transformer (additional timestep embedding row 0,
  layered 3D RoPE: frames 0..layers, the input image on frame -1) predicts the frames;
- sigmas are linspace(1, 0, N + 1)[:-1] (in float32 the same as the other Qwen pipelines'
  linspace(1, 1/N, N)) shifted with mu = sqrt(input-image tokens / 256), not by image size;
- true CFG is the plain combination (diffusers' `cfg_normalize` defaults to off and is not exposed);
- the composite frame is dropped, each layer decoded to an RGBA image: `layers` images per image.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import transformers
from PIL import Image

from ditserve.api import GenerationRequest, InvalidRequest, ModelLimits, RequestDefaults
from ditserve.encoders.qwen import CAPTION_PROMPTS, QwenPromptEncoder
from ditserve.pipelines.base import Pixels, RunControl
from ditserve.pipelines.denoise import Sampling
from ditserve.pipelines.qwen_image import QwenImagePipeline, QwenLatents
from ditserve.pipelines.stages import initial_noise, latent_grid, pack, repeat_per_image, unpack
from ditserve.sampling.flow_match import FlowMatchEuler
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.vae.qwen import decode_qwen, encode_qwen

log = logging.getLogger(__name__)

RESOLUTION = 640  # diffusers' default bucket (640 or 1024)
BASE_SEQ_LEN = 256  # diffusers' base_seqlen = 256 * 256 / 16 / 16


class QwenImageLayeredPipeline(QwenImagePipeline):
    defaults = RequestDefaults(height=RESOLUTION, width=RESOLUTION, num_inference_steps=50, guidance_scale=1.0,
                               true_cfg_scale=4.0, max_sequence_length=512, image_size_area=RESOLUTION**2, layers=4)
    limits = ModelLimits(size_multiple=16, max_sequence_length=1024, min_images=1, max_images=1, max_layers=16,
                         samplers=("euler",), captions=True)
    passes_t_cond: ClassVar[bool] = True
    image_channels: ClassVar[int] = 4
    caption_prompt: ClassVar[str] = CAPTION_PROMPTS["zh"]
    captioner: QwenPromptEncoder | None = None  # the text encoder with the processor/ folder's image processor

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "QwenImageLayeredPipeline":
        """Prompts are tokenised with tokenizer/ (as diffusers); captions go through processor/."""
        pipe = super().load(path, device, dtype)
        if (path / "processor").is_dir():
            pipe.captioner = QwenPromptEncoder(transformers.Qwen2Tokenizer.from_pretrained(str(path / "processor")),
                                               pipe.text.model,
                                               transformers.AutoImageProcessor.from_pretrained(str(path / "processor")))
        return pipe

    def run(self, requests: list[GenerationRequest], control: RunControl):
        """As diffusers: an empty prompt ("" or " ") becomes the model's caption of the input image
        (timed as the stage "caption", before the others)."""
        start = time.perf_counter()
        requests = [self._captioned(r) for r in requests]
        caption_s = time.perf_counter() - start
        pixels, timings = super().run(requests, control)
        if caption_s > 1e-3:
            timings.stages = {"caption": caption_s, **timings.stages}
        return pixels, timings

    def _captioned(self, req: GenerationRequest) -> GenerationRequest:
        if req.prompt not in ("", " "):
            return req
        if self.captioner is None:
            raise InvalidRequest("this Qwen-Image-Layered folder has no processor/ to caption the image with; "
                                 "give a prompt", "prompt")
        image = req.images[0]
        if image.size != (req.width, req.height):
            image = image.resize((req.width, req.height), resample=Image.LANCZOS)
        caption = self.captioner.caption(image, self.caption_prompt, req.seed)
        log.info("empty prompt: the image's caption is %r", caption)
        return replace(req, prompt=caption)

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        return super().batch_key(req) + (req.layers,)

    def prepare_latents(self, requests: list[GenerationRequest]) -> QwenLatents:
        req = requests[0]
        h, w = latent_grid(req.height, req.width, self.vae_scale)
        frames = req.layers + 1
        noise = initial_noise(requests, (frames, self.latent_channels, h, w), self.device, self.dtype)
        x = torch.cat([pack(noise[:, f]) for f in range(frames)], dim=1)
        cond = torch.cat([self.encode_image(r.images[0], r.width, r.height) for r in requests])
        return QwenLatents(x, (h, w), repeat_per_image(cond, requests), ((h, w),), frames)

    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """The input image, RGBA at the output size -> packed, normalised VAE latents [1, Lc, 4C]."""
        image = image.convert("RGBA")
        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
        return pack(encode_qwen(self.vae, pixels.to(self.device, self.dtype)))

    def sampling(self, latents: QwenLatents, requests: list[GenerationRequest]) -> Sampling:
        req = requests[0]
        solver = self.scheduler_spec.solver(req.sampler, req.flow_shift)
        if isinstance(solver, FlowMatchEuler) and solver.cfg.use_dynamic_shifting:
            # the pipeline's own mu: a constant, i.e. a dynamic-shift line with base = max = mu
            mu = (latents.cond.shape[1] / BASE_SEQ_LEN) ** 0.5
            solver = FlowMatchEuler(replace(solver.cfg, base_shift=mu, max_shift=mu))
        guidance = NoGuidance()
        if req.do_true_cfg:
            guidance = ClassifierFree(repeat_per_image(torch.tensor([r.true_cfg_scale for r in requests]), requests))
        return Sampling(solver.schedule(req.num_inference_steps, latents.x.shape[1]), solver, guidance)

    def target_len(self, latents: QwenLatents) -> int:
        """diffusers' zero_cond_t rule: only the first frame's tokens are modulated at t."""
        return latents.x.shape[1] // latents.frames

    def decode(self, latents: QwenLatents) -> Pixels:
        """Every frame but the composite, decoded as one batch of RGBA images [N * layers, H, W, 4]."""
        x = latents.x.unflatten(1, (latents.frames, -1))[:, 1:].flatten(0, 1)
        return Pixels(decode_qwen(self.vae, unpack(x, latents.grid)), per_image=latents.frames - 1)
