"""The HunyuanVideo GPU step bench, run on the CPU: the real architecture maps onto our DiT (on the meta
device, no memory), and a shrunken one goes through `bench_step` with its guards, which a wrong block fails."""

from dataclasses import replace

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from tiny.bench import fp8_biases_lost, shrink, stand_in_accel, unnormed_qkv

from ditserve.bench import hunyuan_video as bench
from ditserve.bench.common import FP8_BLOCK_GUARD, arch_kwargs, architectures
from ditserve.models.common.loading import assign_mapped
from ditserve.models.common.rope import Rotary
from ditserve.models.hunyuan_video.config import HunyuanVideoConfig
from ditserve.models.hunyuan_video.model import HunyuanVideoDiT
from ditserve.models.hunyuan_video.weights import hunyuan_video_key_map

SHRUNK = {"hunyuanvideo": {"transformer": {
    "cls": "HunyuanVideoTransformer3DModel", "in_channels": 4, "out_channels": 4, "num_attention_heads": 2,
    "attention_head_dim": 16, "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1, "patch_size": 2,
    "patch_size_t": 1, "text_embed_dim": 24, "pooled_projection_dim": 20, "rope_axes_dim": [4, 6, 6]}}}


def test_real_architecture_maps_onto_our_dit():
    arch = arch_kwargs(architectures()["hunyuanvideo"]["transformer"])
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel(**arch)
        ours = HunyuanVideoDiT(HunyuanVideoConfig.from_dict(arch))
    sd = ref.state_dict()
    assign_mapped(ours, hunyuan_video_key_map(ours.cfg), set(sd), sd.__getitem__, "meta", torch.bfloat16)
    params = sum(p.numel() for p in ours.parameters())
    assert abs(params / 1e9 - architectures()["hunyuanvideo"]["params_b"]) < 0.2


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


def test_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", compiled=False, txt_len=7)
    assert row["shape"] == "96x64x9, 72+7 tokens (diffusers: 72+256, padding masked)"
    assert row["rel_l2_eager"] <= bench.GUARD_REL_L2 and row["guard_ok"]
    assert max(row["rel_l2_block_update_eager"].values()) <= bench.GUARD_REL_L2
    assert row["ditserve_eager_step_s"] > 0 and row["diffusers_eager_step_s"] > 0


def test_guard_catches_wrong_block_math(shrunk):
    ref, ours = bench.build(device="cpu")
    case = bench.Case(ours, 64, 96, 9, 7, "cpu", torch.bfloat16)
    with torch.no_grad():
        assert max(bench.block_update_rel_l2(ref, ours, case).values()) <= bench.GUARD_REL_L2
        ours.double_blocks[0] = ours.double_blocks[1]  # another block's weights (ours shares its tensors with ref)
        assert bench.block_update_rel_l2(ref, ours, case)["first_double"] > bench.GUARD_REL_L2


@pytest.mark.slow  # inductor on the CPU: ~20 s
def test_compiled_step_guards_on_cpu(shrunk):
    row = bench.bench_step(height=32, width=32, num_frames=5, device="cpu", compiled=True, txt_len=7, compare=False)
    assert row["guard_ok"] and row["rel_l2_vs_diffusers"] <= bench.GUARD_REL_L2 and row["ditserve_step_s"] > 0


def _no_qk_norm(dit):
    for block in dit.blocks:
        block.qkv_op = unnormed_qkv


@pytest.mark.parametrize("spoil,bf16_ok,fp8_ok", [(None, True, True), (_no_qk_norm, False, True),
                                                  pytest.param(fp8_biases_lost, True, False, marks=pytest.mark.slow)])
def test_fast_and_fp8_blocks_are_judged_against_float32(shrunk, monkeypatch, spoil, bf16_ok, fp8_ok):
    """The compiled and fp8 blocks are judged against diffusers' blocks in float32 (bench/common.py,
    UpdateProbe): a right fast path passes, one without QK-norm fails; fp8 blocks pass their own bound and a
    broken fp8 linear fails it. The fast path here: fp8 linears on the CPU, no compile."""
    stand_in_accel(monkeypatch, spoil)
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", txt_len=7, quantization="fp8",
                           compare=False, reps=1)
    assert row["guard_ok"] is bf16_ok and row["fp8_guard_ok"] is fp8_ok
    bound = row["fast_block_bound"]
    if spoil is _no_qk_norm:
        assert all(row["rel_l2_block_update_fp32"][k] > bound[k] for k in bound)
    elif spoil is fp8_biases_lost:
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > 5 * FP8_BLOCK_GUARD


def test_probe_catches_wrong_positions(shrunk):
    """Video tokens rotated by another token's position: the eager probe (vs diffusers' bf16 blocks) and the
    fast paths' bound (vs float32) both fail it."""
    ref, ours = bench.build(device="cpu")
    case = bench.Case(ours, 64, 96, 9, 7, "cpu", torch.bfloat16)
    rope = case.ours.rope
    case.ours = replace(case.ours, rope=Rotary(rope.cos.roll(5, 0), rope.sin.roll(5, 0)))
    with torch.no_grad():
        probe = bench.block_probe(ref, ours, case)
        vs_bf16, vs_fp32 = probe.compare(ours)
    bound = probe.fast_bound(bench.FAST_BLOCK_GUARD)
    assert min(vs_bf16.values()) > bench.GUARD_REL_L2 and all(vs_fp32[k] > bound[k] for k in bound)


def count_calls(monkeypatch) -> dict:
    """Stand-ins for the accelerations, the timer and diffusers' compile; counts each side's DiT calls."""
    from ditserve.bench import common

    stand_in_accel(monkeypatch)
    monkeypatch.setattr(common, "median_time", lambda fn, warmup=3, reps=10: [fn() for _ in range(warmup + reps)]
                        and 1.0)
    monkeypatch.setattr(bench, "compile_diffusers", lambda ref: None)
    calls = {"ours": 0, "ref": 0}
    run, ref = bench.Case.run, bench.Case.ref

    def count(key, fn):
        def counted(*args):
            calls[key] += 1
            return fn(*args)
        return counted

    monkeypatch.setattr(bench.Case, "run", count("ours", run))
    monkeypatch.setattr(bench.Case, "ref", count("ref", ref))
    return calls


def test_720p_call_skips_the_fp8_linears_alone(shrunk, monkeypatch):
    """`fp8_alone=False` with `attention="fp8"` (the 720p call): fp8 linears + fp8 attention replaces the
    fp8-linears-only variant, so ours makes 6 calls, not 8, and that variant's fields are absent."""
    calls = count_calls(monkeypatch)
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", txt_len=7, quantization="fp8", reps=1,
                           attention="fp8", fp8_alone=False)
    assert calls == {"ours": 6, "ref": 3}
    assert "ditserve_fp8_step_s" not in row and row["fp8_attn_attention"] == "fp8"
    assert row["ditserve_fp8_attn_step_s"] > 0 and row["fp8_attn_guard_ok"]
    assert "fp8_floor_step_s" in row


def test_each_dit_is_called_as_documented(shrunk, monkeypatch):
    """At 720p a call is ≈ 20 s: with `reps=1`, ours 2 calls per variant (eager, compiled, fp8), diffusers
    1 eager (its timed call gives the reference output) and 2 compiled; every guard still judged."""
    calls = count_calls(monkeypatch)
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", txt_len=7, quantization="fp8", reps=1)
    assert calls == {"ours": 6, "ref": 3}
    assert row["guard_ok"] and row["fp8_guard_ok"]
    assert {"rel_l2_eager", "rel_l2_vs_diffusers", "fp8_rel_l2_vs_diffusers_bf16", "rel_l2_block_update_eager",
            "rel_l2_block_update_fp32", "fp8_rel_l2_block_update_fp32"} <= set(row)
