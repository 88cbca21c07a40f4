"""The CLIP image encoder of Wan 2.1 image-to-video: the second-to-last hidden states of
CLIPVisionModel over the folder's image processor output, as diffusers'
`WanImageToVideoPipeline.encode_image` computes them (257 tokens for ViT-H/14 at 224 px).

The processor sees the caller's image as given (the pipeline resizes its own copy for the VAE).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from ditserve.encoders.text import load_pretrained
from ditserve.encoders.umt5 import component_class


class ClipImageEncoder:
    """`encoder(images) -> [N, tokens, D]` in the model's dtype, one row per PIL image."""

    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    @classmethod
    def load(cls, folder: Path, processor_folder: Path, device, dtype: torch.dtype,
             processor_cls=transformers.CLIPImageProcessor,
             model_cls=transformers.CLIPVisionModel) -> ClipImageEncoder:
        processor = processor_cls.from_pretrained(str(processor_folder))
        return cls(processor, load_pretrained(model_cls, folder, device, dtype))

    @classmethod
    def from_pipeline_folder(cls, path: Path, device, dtype: torch.dtype) -> ClipImageEncoder | None:
        """`image_encoder/` and `image_processor/` of a Wan I2V folder through the classes its
        model_index.json names; None when the folder has no image encoder (Wan 2.2 I2V, TI2V)."""
        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        if index.get("image_encoder", [None, None])[0] is None:
            return None
        return cls.load(path / "image_encoder", path / "image_processor", device, dtype,
                        processor_cls=component_class(index, "image_processor", "CLIPImageProcessor"),
                        model_cls=component_class(index, "image_encoder", "CLIPVisionModel"))

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.model.device), output_hidden_states=True)
        return out.hidden_states[-2]
