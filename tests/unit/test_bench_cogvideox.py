"""The CogVideoX-5B GPU step bench, run on the CPU: the real architecture maps onto our DiT (on the meta
device, no memory), and a shrunken one goes through `bench_step` end to end."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from tiny.bench import fp8_biases_lost, shrink, stand_in_accel
from torch import nn

from ditserve.bench import cogvideox as bench
from ditserve.bench.common import FP8_BLOCK_GUARD, arch_kwargs, architectures
from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXDiT
from ditserve.models.cogvideox.weights import cogvideox_key_map
from ditserve.models.common.loading import assign_mapped

SHRUNK = {"cogvideox-5b": {"transformer": dict(
    cls="CogVideoXTransformer3DModel", num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    num_layers=2, text_embed_dim=24, time_embed_dim=16, use_rotary_positional_embeddings=True, sample_width=12,
    sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=10)}}


def test_real_architecture_maps_onto_our_dit():
    arch = arch_kwargs(architectures()["cogvideox-5b"]["transformer"])
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**arch)
        ours = CogVideoXDiT(CogVideoXConfig.from_dict(arch))
    sd = ref.state_dict()
    assign_mapped(ours, cogvideox_key_map(ours.cfg), set(sd), sd.__getitem__, "meta", torch.bfloat16)
    params = sum(p.numel() for p in ours.parameters())
    assert abs(params / 1e9 - architectures()["cogvideox-5b"]["params_b"]) < 0.1


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


def test_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", compiled=False)
    assert row["shape"] == "96x64x9, 72+10 tokens, batch 2 (CFG)"
    assert row["rel_l2_eager"] <= bench.GUARD_REL_L2 and row["guard_ok"]
    assert max(row["rel_l2_block_update_eager"].values()) <= bench.GUARD_REL_L2
    assert row["ditserve_eager_step_s"] > 0 and row["diffusers_eager_step_s"] > 0


def test_guard_catches_wrong_block_math(shrunk):
    ref, ours = bench.build(device="cpu")
    inp = bench.inputs(ours, 64, 96, 9, "cpu", torch.bfloat16)
    rope = bench.diffusers_rope(ours.cfg, inp)
    with torch.no_grad():
        assert max(bench.block_update_rel_l2(ref, ours, inp, rope).values()) <= bench.GUARD_REL_L2
        ours.layers[0] = ours.layers[1]  # another block's weights (ours shares its tensors with ref)
        assert bench.block_update_rel_l2(ref, ours, inp, rope)["first"] > bench.GUARD_REL_L2


def _no_qk_norm(dit):
    for module in dit.modules():
        if hasattr(module, "norm_q"):
            module.norm_q = module.norm_k = nn.Identity()


@pytest.mark.parametrize("spoil,bf16_ok,fp8_ok", [(None, True, True), (_no_qk_norm, False, True),
                                                  pytest.param(fp8_biases_lost, True, False, marks=pytest.mark.slow)])
def test_fast_and_fp8_blocks_are_judged_against_float32(shrunk, monkeypatch, spoil, bf16_ok, fp8_ok):
    """The compiled and fp8 blocks are judged against diffusers' blocks in float32 (bench/common.py,
    UpdateProbe): a right fast path passes, one without QK-norm fails; fp8 blocks pass their own bound and a
    broken fp8 linear fails it. The fast path here: fp8 linears on the CPU, no compile."""
    stand_in_accel(monkeypatch, spoil)
    row = bench.bench_step(height=64, width=96, num_frames=9, device="cpu", quantization="fp8", compare=False)
    assert row["guard_ok"] is bf16_ok and row["fp8_guard_ok"] is fp8_ok
    bound = row["fast_block_bound"]
    if spoil is _no_qk_norm:
        assert all(row["rel_l2_block_update_fp32"][k] > bound[k] for k in bound)
    elif spoil is fp8_biases_lost:
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > 5 * FP8_BLOCK_GUARD
