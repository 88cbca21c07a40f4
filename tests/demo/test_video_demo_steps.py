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
