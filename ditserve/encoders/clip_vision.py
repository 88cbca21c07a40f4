"""The CLIP image encoder of Wan 2.1 image-to-video: penultimate hidden states of CLIPVisionModel,
with the folder's image processor (as diffusers' WanImageToVideoPipeline.encode_image)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ditserve.encoders.text import load_pretrained


class ClipImageEncoder:
    def __init__(self, processor, model):
        self.processor, self.model = processor, model

    @classmethod
    def load(cls, folder: Path, processor_folder: Path, device, dtype: torch.dtype) -> "ClipImageEncoder":
        return cls(transformers.CLIPImageProcessor.from_pretrained(str(processor_folder)),
                   load_pretrained(transformers.CLIPVisionModel, folder, device, dtype))

    @torch.no_grad()
    def __call__(self, images: list) -> torch.Tensor:
        """PIL images -> [N, tokens, D] hidden states of the second-to-last layer."""
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.model.device, self.model.dtype), output_hidden_states=True)
        return out.hidden_states[-2]
