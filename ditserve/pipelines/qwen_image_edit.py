"""Qwen-Image-Edit (one input image) and Qwen-Image-Edit-2509+ (`QwenImageEditPlusPipeline`, several;
Edit-2511 is the same pipeline over a `zero_cond_t` transformer: models/qwen_image/model.py).

Each input image reaches the model twice, as diffusers' pipelines pass it:
- to the text encoder, resized to a condition size, as vision tokens inside the prompt template;
- through the VAE, resized to about 1024² pixels at its aspect ratio; its packed latents follow
  the noise latents in the DiT's image sequence (frame 1, 2, ... of MSRoPE) and the prediction for
  them is dropped.
Without a requested size, the output takes the last input image's aspect ratio at about 1024²
pixels (`RequestDefaults.image_size_area`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from PIL import Image

from ditserve.api import GenerationRequest, ModelLimits, RequestDefaults
from ditserve.api.request import size_for_area
from ditserve.encoders.qwen import EDIT_PLUS_TEMPLATE, EDIT_TEMPLATE
from ditserve.pipelines.qwen_image import QwenImagePipeline, QwenLatents
from ditserve.pipelines.stages import latent_grid, pack, repeat_per_image
from ditserve.vae.kl import image_to_tensor
from ditserve.vae.qwen import encode_qwen

VAE_IMAGE_AREA = 1024 * 1024
EDIT_DEFAULTS = RequestDefaults(height=1024, width=1024, num_inference_steps=50, guidance_scale=1.0,
                                true_cfg_scale=4.0, max_sequence_length=512, image_size_area=VAE_IMAGE_AREA)


class QwenImageEditPipeline(QwenImagePipeline):
    defaults = EDIT_DEFAULTS
    limits = ModelLimits(size_multiple=16, max_sequence_length=1024, min_images=1, max_images=1)
    template = EDIT_TEMPLATE
    truncate_text = False
    vision_prompt = True
    vae_image_area: ClassVar[int] = VAE_IMAGE_AREA
    # the text encoder sees the VAE-sized image (Edit) or one resized to this area (Edit Plus)
    condition_image_area: ClassVar[int | None] = None

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        """Requests batch when their input images have the same latent sizes."""
        return super().batch_key(req) + (tuple(cls.vae_size(im) for im in req.images),)

    @classmethod
    def vae_size(cls, image: Image.Image) -> tuple[int, int]:
        """(width, height) an input image is resized to before the VAE."""
        return size_for_area(cls.vae_image_area, *image.size)

    def prompt_images(self, requests: list[GenerationRequest]) -> list[list[Image.Image]]:
        area = self.condition_image_area or self.vae_image_area
        return [[_resize(im, size_for_area(area, *im.size)) for im in r.images] for r in requests]

    def prepare_latents(self, requests: list[GenerationRequest]) -> QwenLatents:
        latents = super().prepare_latents(requests)
        cond = [torch.cat([self.encode_image(im) for im in r.images], dim=1) for r in requests]
        grids = tuple(latent_grid(h, w, self.vae_scale, patch=1)
                      for w, h in (self.vae_size(im) for im in requests[0].images))
        return QwenLatents(latents.x, latents.grid, repeat_per_image(torch.cat(cond), requests), grids)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """One input image -> its packed, normalised VAE latents [1, Lc, 4C]."""
        pixels = image_to_tensor(image, *self.vae_size(image)).to(self.device, self.dtype)
        return pack(encode_qwen(self.vae, pixels))


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    limits = ModelLimits(size_multiple=16, max_sequence_length=1024, min_images=1, max_images=3)
    template = EDIT_PLUS_TEMPLATE
    condition_image_area = 384 * 384


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos resize to (width, height), as diffusers' VaeImageProcessor.resize."""
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, resample=Image.LANCZOS)
