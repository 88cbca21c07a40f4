"""Fixtures of the parallel tests: tiny FLUX variants with 4 and 3 heads, and single-process
reference outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


def _flux_with_heads(tiny_flux_dev, tmp_path_factory, heads: int) -> Path:
    """tiny_flux_dev with a transformer of `heads` heads x 16, weights drawn as the tiny builder
    draws them (here N(0, 0.15)) so the image is far from flat."""
    from diffusers import FluxTransformer2DModel

    from tiny.flux import TRANSFORMER

    path = tmp_path_factory.mktemp(f"tiny_flux_{heads}heads") / "model"
    shutil.copytree(tiny_flux_dev, path)
    shutil.rmtree(path / "transformer")
    torch.manual_seed(41)
    model = FluxTransformer2DModel(**{**TRANSFORMER, "num_attention_heads": heads}, guidance_embeds=True).eval()
    gen = torch.Generator("cpu").manual_seed(42)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.save_pretrained(path / "transformer", safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_flux_4heads(tiny_flux_dev, tmp_path_factory) -> Path:
    """TP x Ulysses and Ulysses 4 need heads divisible by 4."""
    return _flux_with_heads(tiny_flux_dev, tmp_path_factory, 4)


@pytest.fixture(scope="session")
def tiny_flux_3heads(tiny_flux_dev, tmp_path_factory) -> Path:
    """Heads that no degree of 2 divides."""
    return _flux_with_heads(tiny_flux_dev, tmp_path_factory, 3)


_ENGINES: dict[str, object] = {}


def single_process(folder, request: dict) -> np.ndarray:
    """The one-process engine's pixels for `request` (engines cached per folder)."""
    from ditserve.api import GenerationRequest
    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.runtime.engine import Engine

    key = str(folder)
    if key not in _ENGINES:
        _ENGINES[key] = Engine.from_config(EngineConfig(ModelConfig(key, "cpu", "float32")))
    out = _ENGINES[key].generate(GenerationRequest(**request))
    return out.videos[0] if out.videos else np.asarray(out.images[0])


@pytest.fixture(scope="session")
def reference():
    return single_process
