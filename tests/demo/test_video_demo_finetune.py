"""Fine-tuning the bundled video demo: the DiT starting from a folder (``train --dit-init``), and the
decoder fine-tune that leaves the latent space alone (``sharpen``)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from ditserve import demo
from training.video_demo import config
from training.video_demo.__main__ import main
from training.video_demo.dit import build_denoiser, load_weights_from
from training.video_demo.sharpen import edge_weighted_l1

MODEL = demo.VIDEO_MODEL_DIR

pytestmark = pytest.mark.skipif(demo.video_model_path() is None,
                                reason="the trained video demo is not installed at ditserve/demo/video_model")


def test_dit_init_loads_the_folder_weights(tmp_path):
    model = build_denoiser(config.SEED, tmp_path)
    fresh = model.dit.proj_out.weight.detach().clone()
    load_weights_from(model, MODEL)
    shipped = WanTransformer3DModel.from_pretrained(MODEL / "transformer").state_dict()
    assert not torch.equal(fresh, shipped["proj_out.weight"])  # adaLN-Zero starts it at zero
    for name, value in model.dit.state_dict().items():
        assert torch.equal(value, shipped[name]), name


def test_edge_weighted_l1_counts_the_outline_most():
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 5:11, 5:11] = 1.0  # a white square on black
    off_edge, off_far = x.clone(), x.clone()
    off_edge[..., 5, 5:11] = -1.0  # the square's top row lost
    off_far[..., 0, 0:6] = 0.0  # as many background pixels off by half as much, far from it
    assert edge_weighted_l1(x, x, 10.0, 20.0) == 0
    assert edge_weighted_l1(off_edge, x, 10.0, 20.0) > 10 * edge_weighted_l1(off_far, x, 10.0, 20.0)


def test_sharpen_changes_the_decoder_only(tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(MODEL / "vae", folder / "vae")
    before = AutoencoderKLWan.from_pretrained(folder / "vae").state_dict()
    main(["sharpen", "--model-path", str(folder), "--steps", "2", "--batch-size", "1", "--lr", "1e-3",
          "--check-clips", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and 0 <= result["shape_after"] <= 1
    after = AutoencoderKLWan.from_pretrained(folder / "vae")
    assert after.config.latents_mean == json.loads((MODEL / "vae" / "config.json").read_text())["latents_mean"]
    state = after.state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]


def test_train_dit_init_and_lr_reach_the_exported_weights(tmp_path):
    """`train --stage dit --dit-init FOLDER --dit-lr 0`: the DiT starts from FOLDER and, at a zero
    learning rate, is exported exactly as it came (either flag ignored, the weights would differ)."""
    work = tmp_path / "work"
    main(["train", "--recipe", "smoke", "--stage", "vae", "--work-dir", str(work)])
    main(["train", "--recipe", "smoke", "--stage", "dit", "--work-dir", str(work), "--out", str(tmp_path / "out"),
          "--dit-init", str(MODEL), "--dit-lr", "0"])
    shipped = WanTransformer3DModel.from_pretrained(MODEL / "transformer").state_dict()
    exported = WanTransformer3DModel.from_pretrained(tmp_path / "out" / "transformer").state_dict()
    assert shipped.keys() == exported.keys()
    assert all(torch.equal(exported[k], shipped[k]) for k in shipped)


def test_widened_decoder_decodes_the_same_pixels():
    """`sharpen --widen`: twice the decoder channels, the encoder untouched, the same frames from the
    same latents (the copies' split input weights sum to the original; the mid-block attention's
    queries rescaled for its twice-as-wide head: without that the frames differ)."""
    from training.video_demo.widen import widen_decoder

    vae = AutoencoderKLWan(**config.VAE).eval()
    with torch.no_grad():  # diffusers' init leaves the mid-block attention's projection at zero
        for p in vae.decoder.mid_block.attentions[0].parameters():
            p.normal_(0, 0.2)
    wide = widen_decoder(vae).eval()
    assert wide.config.decoder_base_dim == 2 * config.VAE["base_dim"]
    assert wide.decoder.conv_in.weight.shape[0] == 2 * vae.decoder.conv_in.weight.shape[0]
    for name, value in vae.state_dict().items():
        if not name.startswith("decoder."):
            assert torch.equal(wide.state_dict()[name], value), name
    z = torch.randn(1, config.LATENT_CHANNELS, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        narrow_frames, wide_frames = vae.decode(z).sample, wide.decode(z).sample
    assert narrow_frames.shape == wide_frames.shape == (1, 3, 9, 64, 64)
    assert (narrow_frames - wide_frames).abs().max() < 1e-4
    assert narrow_frames.abs().mean() > 0.05  # a decoder that draws something, not a clamp to zero


def test_generated_latents_come_back_in_the_vaes_units():
    """`probe --generated` scores the DiT's latents with a probe fitted on the encoder's: they must be in
    the same units (the pipeline's normalised latents mapped back by latents_std and latents_mean), or
    the probe reads noise. The shipped DiT's frames spread per channel as real clips' do."""
    from training.video_demo.probe import generated_latent_frames, latent_frames
    from training.video_demo.scenes import sample_clips, split_combos

    vae = AutoencoderKLWan.from_pretrained(MODEL / "vae").float().eval()
    frames, labels = generated_latent_frames(MODEL, vae, (0,), prompts=4)
    assert frames.shape == (4 * 5, config.LATENT_CHANNELS, 8, 8) and labels.shape == (20,)
    held = split_combos(config.SEED, config.NUM_HELD_OUT)[1]
    real, _ = latent_frames(vae, sample_clips(config.SEED + 1, 16, held))
    ratio = frames.std((0, 2, 3)) / real.std((0, 2, 3))
    assert ((ratio > 0.5) & (ratio < 2)).all(), ratio
    assert (frames.mean((0, 2, 3)) - real.mean((0, 2, 3))).abs().max() < 0.5
