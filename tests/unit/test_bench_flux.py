"""The FLUX GPU step bench, run on the CPU with a shrunken architecture: it runs end to end and its
block-update guard catches wrong block math that the whole-output rel L2 misses."""

import pytest
import torch
from tiny.bench import fp8_biases_lost, shrink, stand_in_accel, unnormed_qkv

from ditserve.bench import flux as bench
from ditserve.bench.common import FP8_BLOCK_GUARD
from ditserve.models.common.mmdit import norm_rope_qkv

SHRUNK = {"flux.1-dev": {"transformer": {
    "cls": "FluxTransformer2DModel", "attention_head_dim": 32, "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 48, "num_attention_heads": 2,
    "num_layers": 2, "num_single_layers": 2, "patch_size": 1, "pooled_projection_dim": 24}}}


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


def test_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(height=128, width=96, txt_len=16, device="cpu", compiled=False)
    assert row["shape"] == "96x128, 48+16 tokens"
    assert row["guard_ok"] and 0 < row["rel_l2_eager"] <= bench.GUARD_REL_L2
    assert set(row["rel_l2_block_update_eager"]) == {"double", "single"}
    assert max(row["rel_l2_block_update_eager"].values()) <= bench.GUARD_REL_L2
    assert row["diffusers_eager_step_s"] > 0 and row["ditserve_eager_step_s"] > 0


def _unnormed(parts, pe, heads):
    """A broken qkv op: QK-norm left out."""
    plain = [(qkv, lambda q, k: (q, k)) for qkv, _ in parts]
    return norm_rope_qkv(plain, pe, heads)


def test_block_guard_catches_wrong_block_math(shrunk):
    ref, ours = bench.build("flux.1-dev", "cpu", torch.bfloat16)
    inp = bench.inputs(ours.cfg, 64, 96, 8, "cpu", torch.bfloat16)
    with torch.no_grad():
        ok = bench.block_update_rel_l2(ref, ours, inp)
        assert max(ok.values()) <= bench.GUARD_REL_L2
        tables = ours.positional_tables
        ours.positional_tables = lambda img_ids, txt_ids: tables(img_ids[:, [0, 2, 1]], txt_ids)  # rows<->cols
        # in this tiny model attention is nearly uniform, so wrong positions move the update by only
        # 2-4% (0 when right); at FLUX's 4608 tokens they move it far more
        assert min(bench.block_update_rel_l2(ref, ours, inp).values()) > bench.GUARD_REL_L2
        ours.positional_tables = tables
        for block in ours.blocks:
            block.qkv_op = _unnormed
        assert min(bench.block_update_rel_l2(ref, ours, inp).values()) > bench.GUARD_REL_L2


def _no_qk_norm(dit):
    for block in dit.blocks:
        block.qkv_op = unnormed_qkv


@pytest.mark.parametrize("spoil,bf16_ok,fp8_ok", [(None, True, True), (_no_qk_norm, False, True),
                                                  (fp8_biases_lost, True, False)])
def test_fast_and_fp8_blocks_are_judged_against_float32(shrunk, monkeypatch, spoil, bf16_ok, fp8_ok):
    """As the other families' step benches (bench/common.py, UpdateProbe): the fast path's blocks against
    diffusers' float32 blocks, within 1e-2 or 1.5x diffusers' own bf16 error there; fp8 blocks within
    FP8_BLOCK_GUARD. The fast path here: fp8 linears on the CPU, no compile."""
    stand_in_accel(monkeypatch, spoil)
    row = bench.bench_step(height=128, width=96, txt_len=16, device="cpu", quantization="fp8", compare=False)
    assert row["guard_ok"] is bf16_ok and row["fp8_guard_ok"] is fp8_ok
    bound = row["fast_block_bound"]
    if spoil is _no_qk_norm:
        assert all(row["rel_l2_block_update_fp32"][k] > bound[k] for k in bound)
    elif spoil is fp8_biases_lost:
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > 5 * FP8_BLOCK_GUARD


def test_cli_refuses_attention_backend_end_to_end(capsys):
    from ditserve.cli.main import main

    assert main(["bench", "--model", "flux.1-dev", "--end-to-end", "--attention-backend", "fp8",
                 "--quantization", "fp8"]) == 2
    assert "and Wan's --end-to-end" in capsys.readouterr().err
    assert main(["bench", "--model", "flux.1-dev", "--attention-backend", "fp8"]) == 2
    assert "add --quantization fp8" in capsys.readouterr().err
