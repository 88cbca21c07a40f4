"""The demo's training chain at smoke size: it runs end to end, exports a loadable pipeline, and a run
broken off after a checkpoint resumes to exactly the weights of an unbroken run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.demo import __main__ as cli
from training.demo import config
from training.demo.dit import build_denoiser, caption_variants, token_tables
from training.demo.scenes import CAPTION_WORDS, split_combos

WEIGHTS = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"]


def _train(work, out, *flags):
    # the command sets torch's thread count; keep this process's
    cli.main(["train", "--work-dir", str(work), "--out", str(out), "--recipe", "smoke",
              "--threads", str(torch.get_num_threads()), *flags])


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    _train(root / "work", root / "model")
    return root


def test_smoke_run_exports_a_pipeline(unbroken):
    model = unbroken / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    assert json.loads((model / "ditserve.json").read_text())["defaults"] == config.REQUEST_DEFAULTS
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    latents = torch.load(unbroken / "work" / "latents.pt")
    assert vae_cfg["scaling_factor"] == pytest.approx(latents["scale"])
    assert vae_cfg["shift_factor"] == pytest.approx(latents["shift"])
    for name in WEIGHTS:
        assert load_file(model / name)
    from ditserve import Generator
    image = Generator.from_pretrained(model, device="cpu", dtype=torch.float32).generate(
        "a red circle on the left, blue background", seed=0, num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_interrupted_run_resumes_to_the_same_weights(unbroken, tmp_path):
    """Three sittings: stop the VAE half-way, then the DiT half-way, then finish."""
    smoke = config.RECIPES["smoke"]
    work, out = tmp_path / "work", tmp_path / "model"
    _train(work, out, "--vae-stop-after", "3", "--dit-stop-after", "0")
    assert torch.load(work / "vae.ckpt")["step"] == 3 and not (work / "dit.ckpt").exists()
    _train(work, out, "--dit-stop-after", "3")
    assert torch.load(work / "vae.ckpt")["step"] == smoke.vae.steps
    assert torch.load(work / "dit.ckpt")["step"] == 3
    _train(work, out)
    assert torch.load(work / "dit.ckpt")["step"] == smoke.dit.steps
    for name in WEIGHTS:
        expected, got = load_file(unbroken / "model" / name), load_file(out / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name


def test_every_caption_word_is_one_token(tmp_path):
    build_denoiser(0, tmp_path)  # writes the tokenizers
    train, _ = split_combos(config.SEED, config.NUM_HELD_OUT)
    t5_ids, clip_ids = token_tables(tmp_path, train[:5])
    assert t5_ids.shape == (5, len(caption_variants(train[0])), config.MAX_SEQUENCE_LENGTH)
    assert clip_ids.shape[-1] == 77
    from transformers import CLIPTokenizer, T5TokenizerFast
    clip = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(tmp_path / "tokenizer_2")
    for word in CAPTION_WORDS:
        assert clip.tokenize(word) == [word + "</w>"]
        assert t5.tokenize(word) == ["\u2581" + word]
    caption = train[0].caption
    assert len(t5(caption).input_ids) == len(caption.replace(",", " ,").split()) + 1  # words + </s>
