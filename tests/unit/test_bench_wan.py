"""The Wan GPU step bench, run on the CPU with a shrunken architecture: same weights in both models,
its guard holds, and a wrong model would fail it."""

import pytest
from tiny.bench import shrink
from torch import nn

from ditserve.bench import wan as bench

SHRUNK = {"wan2.1-t2v-1.3b": {"transformer": {
    "cls": "WanTransformer3DModel", "attention_head_dim": 32, "cross_attn_norm": True, "eps": 1e-6, "ffn_dim": 96,
    "freq_dim": 64, "in_channels": 16, "num_attention_heads": 2, "num_layers": 2, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 256, "text_dim": 48}}}


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
