"""`model_index.json` `_class_name` -> our pipeline class. Families import lazily."""

from __future__ import annotations

import importlib

from ditserve.api import InvalidRequest

# _class_name -> "module:Class"
_PIPELINES: dict[str, str] = {
    "CogVideoXPipeline": "ditserve.pipelines.cogvideox:CogVideoXPipeline",
    "CogVideoXImageToVideoPipeline": "ditserve.pipelines.cogvideox:CogVideoXImageToVideoPipeline",
    "FluxPipeline": "ditserve.pipelines.flux:FluxPipeline",
    "HunyuanVideoPipeline": "ditserve.pipelines.hunyuan_video:HunyuanVideoPipeline",
    "QwenImagePipeline": "ditserve.pipelines.qwen_image:QwenImagePipeline",
    "QwenImageEditPipeline": "ditserve.pipelines.qwen_image_edit:QwenImageEditPipeline",
    "QwenImageEditPlusPipeline": "ditserve.pipelines.qwen_image_edit:QwenImageEditPlusPipeline",
    "QwenImageLayeredPipeline": "ditserve.pipelines.qwen_image_layered:QwenImageLayeredPipeline",
    "StableDiffusion3Pipeline": "ditserve.pipelines.sd3:StableDiffusion3Pipeline",
    "WanPipeline": "ditserve.pipelines.wan:WanPipeline",
    "WanImageToVideoPipeline": "ditserve.pipelines.wan:WanImageToVideoPipeline",
}


def supported_class_names() -> list[str]:
    return sorted(_PIPELINES)


def pipeline_class(class_name: str):
    """The pipeline class for a diffusers `_class_name`, or InvalidRequest naming what we support."""
    target = _PIPELINES.get(class_name)
    if target is None:
        raise InvalidRequest(
            f"unsupported pipeline {class_name!r}; supported: {', '.join(supported_class_names())}",
            "model",
        )
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
