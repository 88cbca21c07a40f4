"""The video demo's training chain at smoke size (about 30 s on a CPU, so `slow`): it runs end to end and
exports a WanPipeline folder that diffusers loads and that gives the same frames as ditserve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.video_demo import __main__ as cli
from training.video_demo import config

pytestmark = pytest.mark.slow

WEIGHTS = ["transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors"]
PROMPT = "a red circle moving right, blue background"


@pytest.fixture(scope="module", params=[8, 4], ids=["vae8x", "vae4x"])
def smoke(tmp_path_factory, request):
    """The chain with the shipped 8x VAE and with `--vae-spatial 4` (16 x 16 latents a frame)."""
    root = tmp_path_factory.mktemp("video_smoke")
    # the command sets torch's thread count; keep this process's
    cli.main(["train", "--recipe", "smoke", "--work-dir", str(root / "work"), "--out", str(root / "video_model"),
              "--threads", str(torch.get_num_threads()), "--vae-spatial", str(request.param)])
    vae = json.loads((root / "video_model" / "vae" / "config.json").read_text())
    assert vae["scale_factor_spatial"] == request.param
    assert torch.load(root / "work" / "latents.pt")["latents"].shape[-2:] == (64 // request.param,) * 2
    return root


def test_smoke_run_exports_a_wan_pipeline(smoke):
    model = smoke / "video_model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["tokenizer"] == ["transformers", "T5TokenizerFast"]
    assert json.loads((model / "ditserve.json").read_text())["defaults"] == config.REQUEST_DEFAULTS
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler" and scheduler["use_flow_sigmas"]
    assert scheduler["flow_shift"] == config.FLOW_SHIFT
    vae = json.loads((model / "vae" / "config.json").read_text())
    latents = torch.load(smoke / "work" / "latents.pt")
    assert vae["latents_mean"] == pytest.approx(latents["mean"]) and vae["latents_std"] == pytest.approx(latents["std"])
    for name in WEIGHTS:
        assert load_file(model / name)
    assert sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) < 25e6


def test_same_frames_as_diffusers(smoke):
    from diffusers import WanPipeline

    from ditserve import Generator

    model = smoke / "video_model"
    pipe = WanPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    d = config.REQUEST_DEFAULTS
    ref = pipe(PROMPT, height=d["height"], width=d["width"], num_frames=d["num_frames"], num_inference_steps=3,
               guidance_scale=d["guidance_scale"], max_sequence_length=d["max_sequence_length"],
               generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames[0]
    expected = (ref * 255).round().astype(np.uint8)
    out = Generator.from_pretrained(model, device="cpu", dtype=torch.float32).generate(PROMPT, seed=0,
                                                                                       num_inference_steps=3)
    got = np.asarray(out.videos[0])  # the folder's own defaults: 64x64, 17 frames
    assert got.shape == expected.shape == (17, 64, 64, 3) and out.fps == 8
    assert expected.std() > 5
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_two_sittings_vae_then_dit(tmp_path):
    work, out = tmp_path / "work", tmp_path / "video_model"
    threads = str(torch.get_num_threads())
    with pytest.raises(SystemExit, match="--stage dit needs"):
        cli.main(["train", "--recipe", "smoke", "--stage", "dit", "--work-dir", str(work), "--threads", threads])
    cli.main(["train", "--recipe", "smoke", "--stage", "vae", "--work-dir", str(work), "--threads", threads])
    assert not (work / "dit.ckpt").exists() and not out.exists()
    long = torch.load(work / "vae_long.ckpt")
    assert long["step"] == config.recipe("smoke").vae_long.steps
    cli.main(["train", "--recipe", "smoke", "--stage", "dit", "--work-dir", str(work), "--out", str(out),
              "--threads", threads])
    assert torch.load(work / "vae_long.ckpt")["step"] == long["step"]  # the VAE was not trained further
    assert torch.load(work / "dit.ckpt")["step"] == config.recipe("smoke").dit.steps
    assert (out / "model_index.json").is_file()
