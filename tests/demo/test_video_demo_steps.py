"""The video demo's training-step pieces that make it learn and run fast (CPU, about a second): the
VAE's loss sees the decoder's output before its clamp, the posterior starts nearly deterministic,
UMT5 gets its padding as the additive mask transformers would build (graph-safe, same states), and
the optimiser helpers that CUDA-graph capture relies on."""

from __future__ import annotations

import pytest
import torch

from training.video_demo import config
from training.video_demo.common import (
    _restore,
    _snapshot,
    lr_tensors_on,
    lr_value,
    make_adamw,
    set_lr,
)
from training.video_demo.dit import build_denoiser, token_tables
from training.video_demo.scenes import split_combos
from training.video_demo.vae import build_vae, decode_unclamped


def test_decode_unclamped_is_decode_before_its_clamp():
    vae = build_vae(0).eval()
    z = torch.randn(1, config.LATENT_CHANNELS, 2, 8, 8)
    with torch.no_grad():
        raw = decode_unclamped(vae, z)
        assert torch.equal(raw.clamp(-1, 1), vae.decode(z).sample)
    assert raw.shape == (1, 3, 5, 64, 64)


def test_posterior_starts_nearly_deterministic():
    vae = build_vae(0).eval()
    with torch.no_grad():
        posterior = vae.encode(torch.rand(1, 3, 5, 64, 64) * 2 - 1).latent_dist
    assert posterior.std.max() < 0.2


def test_text_states_with_the_additive_mask_equal_transformers_2d_mask(tmp_path):
    combos, _ = split_combos(config.SEED, config.NUM_HELD_OUT)
    model = build_denoiser(0, tmp_path).eval()
    ids, mask = token_tables(tmp_path, combos)
    ids, mask = ids[[0, 7, -1], 0], mask[[0, 7, -1], 0]  # two captions and the empty prompt
    assert mask.sum(1).min() < mask.sum(1).max() < mask.shape[1]  # some padding, of different lengths
    with torch.no_grad():
        expected = model.text_encoder(ids, mask).last_hidden_state * mask[..., None]
        assert torch.allclose(model.encode(ids, mask), expected, atol=1e-6)


def test_optimiser_helpers_restore_in_place_and_set_lr():
    layer = torch.nn.Linear(3, 2)
    opt = make_adamw(layer.parameters(), 1e-3, torch.device("cpu"))
    set_lr(opt, 5e-4)
    assert lr_value(opt) == 5e-4
    weight = layer.weight.detach().clone()
    snap = _snapshot([layer], opt)
    for _ in range(2):
        opt.zero_grad()
        layer(torch.ones(4, 3)).sum().backward()
        opt.step()
    assert not torch.equal(layer.weight, weight)
    _restore([layer], opt, snap)  # the optimiser had no state: its (new) state is zeroed
    assert torch.equal(layer.weight, weight)
    assert all(float(v.abs().max()) == 0 for s in opt.state.values() for v in s.values())
    opt.param_groups[0]["lr"] = torch.tensor(2e-4)  # as a CUDA checkpoint restores it
    lr_tensors_on(opt, torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4) and not opt.param_groups[0]["capturable"]


def test_background_mask_is_the_shape_and_weights_the_loss():
    from training.video_demo.scenes import Clip, parse_caption, render_clips
    from training.video_demo.vae import background_mask, clips_to_tensor, reconstruction_loss

    clip = Clip(parse_caption("a red square moving right, blue background"), size=16, speed=2, x0=20, y0=30)
    x = clips_to_tensor(render_clips([clip], 5))
    mask = background_mask(x)[0, 0]  # [T, H, W]
    assert mask.shape == (5, 64, 64)
    for t in range(5):  # the 16 px square, moving 2 px a frame
        ys, xs = mask[t].nonzero(as_tuple=True)
        assert 14 <= ys.max() - ys.min() + 1 <= 17 and 14 <= xs.max() - xs.min() + 1 <= 17
        assert abs(xs.float().mean().item() - (20 + 2 * t - 0.5)) < 1.5
    recon = x.clone()
    recon[background_mask(x).expand_as(x) > 0] = 0.0  # the shape lost, the background perfect
    plain, weighted = reconstruction_loss(recon, x, 0.0), reconstruction_loss(recon, x, 10.0)
    err = recon - x
    assert torch.allclose(plain, err.abs().mean() + err.square().mean())
    assert weighted > 5 * plain


def test_load_vae_takes_the_long_phase_checkpoint(tmp_path):
    from training.demo.common import save_checkpoint
    from training.video_demo.vae import load_vae

    recipe = config.recipe("smoke")
    short, long = build_vae(1), build_vae(2)
    save_checkpoint(tmp_path / "vae.ckpt", {"model": short.state_dict(), "step": 3})
    save_checkpoint(tmp_path / "vae_long.ckpt", {"model": long.state_dict(), "step": 2})
    vae, steps = load_vae(tmp_path, recipe, torch.device("cpu"))
    assert steps == 5 and not vae.training
    assert torch.equal(vae.quant_conv.weight, long.quant_conv.weight)
