"""The SD3.5 GPU step bench, run on the CPU: the real architectures map onto our DiT (on the meta
device, no memory), and shrunken ones go through `bench_step` end to end."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from tiny.bench import fp8_biases_lost, shrink, stand_in_accel
from torch.utils.flop_counter import FlopCounterMode

from ditserve.bench import sd3 as bench
from ditserve.bench.common import FP8_BLOCK_GUARD, arch_kwargs, architectures
from ditserve.cli.main import main
from ditserve.models.common.loading import assign_mapped
from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.model import SD3DiT
from ditserve.models.sd3.weights import sd3_key_map

_TINY = dict(cls="SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=16, num_layers=3,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=32,
             pooled_projection_dim=40, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm")
SHRUNK = {"sd3.5-large": {"transformer": _TINY},
          "sd3.5-medium": {"transformer": dict(_TINY, dual_attention_layers=[0, 1])}}


@pytest.mark.parametrize("model", ["sd3.5-large", "sd3.5-medium"])
def test_real_architecture_maps_onto_our_dit(model):
    arch = arch_kwargs(architectures()[model]["transformer"])
    with torch.device("meta"):
        ref = SD3Transformer2DModel(**arch)
        ours = SD3DiT(SD3Config.from_dict(arch))
    sd = ref.state_dict()
    assign_mapped(ours, sd3_key_map(ours.cfg), set(sd), sd.__getitem__, "meta", torch.bfloat16)
    # the position table is a buffer in diffusers, not counted in the published sizes (226M on Medium)
    params = sum(p.numel() for name, p in ours.named_parameters() if name != "pos_table")
    assert abs(params / 1e9 - architectures()[model]["params_b"]) < 0.1


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


@pytest.mark.parametrize("model", ["sd3.5-large", "sd3.5-medium"])
def test_bench_step_runs_and_guards_on_cpu(shrunk, model):
    row = bench.bench_step(model, height=96, width=128, txt_len=12, device="cpu", compiled=False)
    assert row["shape"] == "128x96, 48+12 tokens, batch 2 (CFG)"
    assert row["rel_l2_eager"] <= bench.GUARD_REL_L2 and row["guard_ok"]  # 0.0 on the CPU: the same bits
    assert max(row["rel_l2_block_update_eager"].values()) <= bench.GUARD_REL_L2
    assert row["ditserve_eager_step_s"] > 0 and row["diffusers_eager_step_s"] > 0


def test_guard_catches_wrong_block_math(shrunk):
    """The block-update guard is not vacuous: a dropped second attention, swapped streams or another
    block's weights fail it."""
    ref, ours = bench.build("sd3.5-medium", device="cpu")
    inp = bench.inputs(ours.cfg, 64, 96, 8, "cpu", torch.bfloat16)
    with torch.no_grad():
        assert max(bench.block_update_rel_l2(ref, ours, inp).values()) <= bench.GUARD_REL_L2
        first = ours.blocks[0]
        first.dual = False  # MMDiT-X's image-only attention left out
        assert bench.block_update_rel_l2(ref, ours, inp)["first"] > 3 * bench.GUARD_REL_L2
        first.dual = True
        first.img_attn, first.txt_attn = first.txt_attn, first.img_attn
        assert bench.block_update_rel_l2(ref, ours, inp)["first"] > 10 * bench.GUARD_REL_L2
        last = ours.blocks[-1]
        last.img_mlp = ours.blocks[0].img_mlp  # another block's MLP
        assert bench.block_update_rel_l2(ref, ours, inp)["last"] > 10 * bench.GUARD_REL_L2


def _no_qk_norm(dit):
    for block in dit.blocks:
        for attn in (block.img_attn, block.txt_attn, block.attn2):
            if attn is not None:
                attn.norm = None


@pytest.mark.parametrize("spoil,bf16_ok,fp8_ok", [(None, True, True), (_no_qk_norm, False, True),
                                                  pytest.param(fp8_biases_lost, True, False, marks=pytest.mark.slow)])
def test_fast_and_fp8_blocks_are_judged_against_float32(shrunk, monkeypatch, spoil, bf16_ok, fp8_ok):
    """The compiled and fp8 paths' block updates are judged against diffusers' blocks in float32 (bf16 blocks
    that round elsewhere differ by ≈ 3 % with right math on the H200): a right fast path passes, one without
    QK-norm fails the bf16 bound; fp8 blocks (≈ 3-5 % off float32 from e4m3 alone, above the bf16 bound) pass
    their own bound, and a broken fp8 linear fails it. The fast path here: fp8 linears on the CPU, no compile."""
    stand_in_accel(monkeypatch, spoil)
    row = bench.bench_step("sd3.5-medium", height=64, width=96, txt_len=8, device="cpu", quantization="fp8",
                           compare=False)
    assert row["guard_ok"] is bf16_ok and row["fp8_guard_ok"] is fp8_ok
    bound = row["fast_block_bound"]
    assert all(bench.FAST_BLOCK_GUARD <= b < 2 * bench.FAST_BLOCK_GUARD for b in bound.values())
    if spoil is None:
        assert row["rel_l2_block_update_fp32"] == pytest.approx(row["block_update_floor"], rel=1e-2)  # no compile
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > max(bound.values())
    elif spoil is _no_qk_norm:
        assert all(row["rel_l2_block_update_fp32"][k] > bound[k] for k in bound)
    else:
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > 5 * FP8_BLOCK_GUARD


@pytest.mark.slow  # inductor on the CPU: ≈ 60 s
def test_compiled_blocks_pass_their_bound_on_cpu(shrunk):
    row = bench.bench_step("sd3.5-large", height=64, width=64, txt_len=8, device="cpu", compare=False)
    assert row["guard_ok"], row
    assert all(v <= row["fast_block_bound"][k] for k, v in row["rel_l2_block_update_fp32"].items())


@pytest.mark.parametrize("model", ["sd3.5-large", "sd3.5-medium"])
def test_step_flops_counts_the_matmuls(shrunk, model):
    _, ours = bench.build(model, device="cpu", dtype=torch.float32)
    inp = bench.inputs(ours.cfg, 128, 128, 16, "cpu", torch.float32, batch=1)

    def matmul_attention(q, k, v):  # plain matmuls, which the counter sees on any device
        return (q.transpose(1, 2) @ k.transpose(1, 2).mT / q.shape[-1] ** 0.5).softmax(-1).matmul(
            v.transpose(1, 2)).transpose(1, 2)

    for block in ours.blocks:
        block.attn_op = block.attn2_op = matmul_attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours(inp)
    expected = bench.step_flops(ours.cfg, 64, 16)
    # the formula leaves out the embeddings, modulation and the head (a few % at this toy width)
    assert expected < counter.get_total_flops() < 1.15 * expected


@pytest.mark.parametrize("extra,needle", [([], "needs a CUDA GPU"), (["--end-to-end"], "DiT step only")])
def test_cli_dispatches_sd3(capsys, extra, needle):
    if torch.cuda.is_available() and not extra:
        pytest.skip("a GPU is present: the bench would really run")
    assert main(["bench", "--model", "sd3.5-medium", *extra]) == 2
    assert needle in capsys.readouterr().err


def test_fp8_attention_variant_is_run_and_judged(shrunk, monkeypatch):
    """`attention="fp8"` adds a compiled variant with fp8 linears and the fp8 attention backend (here its
    numerics emulated on the CPU): its own timing, error and guard, beside the fp8-linears-only variant."""
    stand_in_accel(monkeypatch)
    row = bench.bench_step("sd3.5-large", height=64, width=96, txt_len=8, device="cpu", quantization="fp8",
                           compare=False, attention="fp8")
    assert row["fp8_attention"] == "auto" and row["fp8_attn_attention"] == "fp8"
    assert row["ditserve_fp8_attn_step_s"] > 0 and row["fp8_attn_guard_ok"]
    # e4m3 q, k, v and P: not the fp8-linears-only output, but close to it
    assert row["fp8_attn_rel_l2_vs_diffusers_bf16"] != row["fp8_rel_l2_vs_diffusers_bf16"]
    assert row["fp8_attn_rel_l2_vs_diffusers_bf16"] < 3 * row["fp8_rel_l2_vs_diffusers_bf16"] + 1e-2
