"""The offline tiny checkpoints load in diffusers and produce non-trivial images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

FIXTURES = ["tiny_flux_dev", "tiny_flux_schnell", "tiny_flux_dev_sharded"]

_pipes: dict[str, FluxPipeline] = {}


def _pipe(request, name: str) -> FluxPipeline:
    if name not in _pipes:
        pipe = FluxPipeline.from_pretrained(request.getfixturevalue(name))
        pipe.set_progress_bar_config(disable=True)
        _pipes[name] = pipe
    return _pipes[name]


def _generate(pipe: FluxPipeline, prompt: str) -> np.ndarray:
    out = pipe(prompt, height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    img = out.images[0]
    assert img.shape == (64, 64, 3)
    assert np.isfinite(img).all()
    return (img * 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_generates_varied_image(request, name):
    img = _generate(_pipe(request, name), "a photo of a cat")
    assert img.std() > 10, f"{name}: image is nearly flat (std {img.std():.2f})"


@pytest.mark.parametrize("name", FIXTURES)
def test_different_prompts_give_different_images(request, name):
    pipe = _pipe(request, name)
    a = _generate(pipe, "a photo of a cat").astype(np.int16)
    b = _generate(pipe, "a red house in the snow").astype(np.int16)
    assert np.abs(a - b).mean() > 1.0


def test_sharded_transformer_and_identical_weights(tiny_flux_dev, tiny_flux_dev_sharded):
    tdir = tiny_flux_dev_sharded / "transformer"
    index = json.loads((tdir / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(tdir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    assert not (tdir / "diffusion_pytorch_model.safetensors").exists()
    # Same seed -> the sharded checkpoint holds exactly the unsharded weights.
    from safetensors.torch import load_file
    single = load_file(tiny_flux_dev / "transformer" / "diffusion_pytorch_model.safetensors")
    merged = {k: v for p in shards for k, v in load_file(p).items()}
    assert single.keys() == merged.keys()
    assert all(torch.equal(single[k], merged[k]) for k in single)


def test_schedulers(tiny_flux_dev, tiny_flux_schnell):
    dev = json.loads((tiny_flux_dev / "scheduler" / "scheduler_config.json").read_text())
    schnell = json.loads((tiny_flux_schnell / "scheduler" / "scheduler_config.json").read_text())
    assert (dev["shift"], dev["use_dynamic_shifting"]) == (3.0, True)
    assert (schnell["shift"], schnell["use_dynamic_shifting"]) == (1.0, False)
    for cfg in (dev, schnell):
        assert (cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]) == (
            256, 4096, 0.5, 1.15)


def test_tokenizers_roundtrip(tiny_flux_dev):
    clip = CLIPTokenizer.from_pretrained(tiny_flux_dev / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tiny_flux_dev / "tokenizer_2")
    assert clip.model_max_length == 77 and len(clip) == 514
    for tok in (clip, t5):
        ids = tok(["a photo of a cat", "a photo of a dog"], padding="max_length", max_length=32,
                  truncation=True).input_ids
        assert all(len(x) == 32 for x in ids)
        assert ids[0] != ids[1]
        assert tok.decode(ids[0], skip_special_tokens=True) == "a photo of a cat"
    assert t5("a cat").input_ids[-1] == t5.eos_token_id == 1
    assert clip("a cat").input_ids[0] == clip.bos_token_id
