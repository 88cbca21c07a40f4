"""The Wan GPU step bench, run on the CPU with a shrunken architecture: same weights in both models,
its guard holds, and a wrong model would fail it; the real Wan2.2-TI2V-5B architecture maps onto our DiT
(on the meta device, no memory) and its bench runs through the 16x VAE's grid with per-token timesteps."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from tiny.bench import shrink
from torch import nn

from ditserve.bench import wan as bench
from ditserve.bench.common import arch_kwargs, architectures
from ditserve.models.common.loading import assign_mapped
from ditserve.models.wan.config import WanConfig
from ditserve.models.wan.model import WanDiT
from ditserve.models.wan.weights import wan_key_map
from ditserve.vae.wan import VideoLatentShape

TINY = {"cls": "WanTransformer3DModel", "attention_head_dim": 32, "cross_attn_norm": True, "eps": 1e-6,
        "ffn_dim": 96, "freq_dim": 64, "in_channels": 16, "num_attention_heads": 2, "num_layers": 2,
        "out_channels": 16, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 256,
        "text_dim": 48}
TI2V = "wan2.2-ti2v-5b"
SHRUNK = {"wan2.1-t2v-1.3b": {"transformer": TINY},
          TI2V: {"transformer": dict(TINY, in_channels=48, out_channels=48),
                 "vae": {"cls": "AutoencoderKLWan", "z_dim": 48, "scale_factor_spatial": 16},
                 "pipeline": {"cls": "WanPipeline", "expand_timesteps": True}}}


def test_real_ti2v_architecture_maps_onto_our_dit():
    real = architectures()[TI2V]
    arch = arch_kwargs(real["transformer"])
    with torch.device("meta"):
        ref = WanTransformer3DModel(**arch)
        ours = WanDiT(WanConfig.from_dict(arch))
    sd = ref.state_dict()
    assign_mapped(ours, wan_key_map(ours.cfg), set(sd), sd.__getitem__, "meta", torch.bfloat16)
    params = sum(p.numel() for p in ours.parameters())
    assert abs(params / 1e9 - real["params_b"]) < 0.05  # 5.00B: "TI2V-5B"
    assert (ours.cfg.hidden_size, ours.cfg.num_layers, ours.cfg.in_channels) == (3072, 30, 48)
    # 704x1280x121 through the 16x VAE: 31 latent frames of 44 x 80, 2x2 patches
    height, width, frames = bench.default_size(TI2V)
    latents = VideoLatentShape.from_config(real["vae"]).latents(frames, height, width)
    assert (height, width, frames, latents) == (704, 1280, 121, (48, 31, 44, 80))
    assert ours.grid((1, *latents)) == (31, 22, 40)  # 27,280 tokens
    assert bench.vae_spatial(TI2V) == 16 and bench.per_token_timesteps(TI2V)


def test_wan21_rows_keep_their_defaults():
    for model in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        assert bench.default_size(model) == (480, 832, 81)
        assert bench.vae_spatial(model) == 8 and not bench.per_token_timesteps(model)


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


def test_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(height=64, width=96, frames=5, device="cpu", compiled=False)
    assert row["shape"] == "96x64x5, 48+512 tokens"  # 2 latent frames x 4 x 6 patches
    assert row["guard_ok"] and 0 <= row["rel_l2_eager"] <= bench.GUARD_REL_L2
    assert row["diffusers_eager_step_s"] > 0 and row["step_tflop"] > 0


def test_guard_catches_a_wrong_model(shrunk, monkeypatch):
    real = bench.build

    def broken(*args, **kwargs):
        ref, ours = real(*args, **kwargs)  # the two share weight tensors: break the math, not a weight
        ffn = ours.layers[0].ffn
        ours.layers[0].ffn = nn.Sequential(ffn[0], nn.ReLU(), ffn[2])  # the wrong activation (4.5% off)
        return ref, ours

    monkeypatch.setattr(bench, "build", broken)
    assert not bench.bench_step(height=64, width=96, frames=5, device="cpu", compiled=False)["guard_ok"]


@pytest.mark.slow
def test_attention_backend_variant_is_timed_and_guarded(shrunk):
    """The compiled step once more with another attention backend (on the CPU every backend is SDPA,
    so the variant must match the plain compiled step's error)."""
    row = bench.bench_step(height=64, width=96, frames=5, device="cpu", reps=1, attention="fp8")
    assert row["attn_attention"] == "fp8" and row["ditserve_attn_step_s"] > 0
    assert row["attn_guard_ok"] and row["attn_rel_l2_vs_diffusers_bf16"] <= 2 * row["rel_l2_vs_diffusers"] + 1e-3
    assert "attn_speedup_vs_diffusers_compiled" in row and "fp8_attention" not in row


def test_ti2v_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(TI2V, height=128, width=192, frames=5, device="cpu", compiled=False)
    assert row["shape"] == "192x128x5, 48+512 tokens, per-token timesteps"  # 2 latent frames x 4 x 6 patches (16x VAE)
    assert row["guard_ok"] and 0 <= row["rel_l2_eager"] <= bench.GUARD_REL_L2
    assert row["rel_l2_block_update_eager"] <= bench.GUARD_REL_L2 and row["diffusers_eager_step_s"] > 0
    cfg = WanConfig.from_dict(arch_kwargs(SHRUNK[TI2V]["transformer"]))
    assert row["step_tflop"] * 1e12 > bench.step_flops(cfg, 48)  # + the per-token time embedding


def test_ti2v_inputs_carry_a_timestep_per_token():
    cfg = WanConfig.from_dict(arch_kwargs(SHRUNK[TI2V]["transformer"]))
    inp = bench.inputs(cfg, 128, 192, 5, "cpu", torch.bfloat16, spatial=16, per_token=True)
    assert inp.latents.shape == (1, 48, 2, 8, 12) and inp.timesteps.shape == (1, 48)
    assert (inp.timesteps[0, :24] == 0).all() and (inp.timesteps[0, 24:] == 600).all()  # the image's frame at 0


def test_guard_catches_a_model_that_drops_per_token_timesteps(shrunk, monkeypatch):
    real = bench.build

    def broken(*args, **kwargs):
        ref, ours = real(*args, **kwargs)
        embed = ours.time_embedding  # one timestep for the whole video, as Wan 2.1 takes it
        ours.time_embedding = lambda t, like: embed(t.amax(-1, keepdim=True).expand_as(t), like)
        return ref, ours

    monkeypatch.setattr(bench, "build", broken)
    assert not bench.bench_step(TI2V, height=128, width=192, frames=5, device="cpu", compiled=False)["guard_ok"]
