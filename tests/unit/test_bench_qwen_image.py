"""The Qwen-Image GPU step bench, run on the CPU: the real architecture maps onto our DiT (on the
meta device, no memory), and a shrunken one goes through `bench_step` end to end."""

import dataclasses

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from tiny.bench import fp8_biases_lost, shrink, stand_in_accel
from torch.utils.flop_counter import FlopCounterMode

from ditserve.bench import qwen_image as bench
from ditserve.bench.common import FP8_BLOCK_GUARD, arch_kwargs, architectures
from ditserve.cli.main import main
from ditserve.models.common.loading import assign_mapped
from ditserve.models.common.mmdit import norm_rope_qkv
from ditserve.models.common.rope import Rotary
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT
from ditserve.models.qwen_image.weights import qwen_image_key_map

SHRUNK = {"qwen-image": {"transformer": {
    "cls": "QwenImageTransformer2DModel", "attention_head_dim": 32, "axes_dims_rope": [8, 12, 12],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 48, "num_attention_heads": 2,
    "num_layers": 2, "out_channels": 16, "patch_size": 2}}}


def test_real_architecture_maps_onto_our_dit():
    arch = arch_kwargs(architectures()["qwen-image"]["transformer"])
    with torch.device("meta"):
        ref = QwenImageTransformer2DModel(**arch)
        ours = QwenImageDiT(QwenImageConfig.from_dict(arch))
    sd = ref.state_dict()
    assign_mapped(ours, qwen_image_key_map(ours.cfg), set(sd), sd.__getitem__, "meta", torch.bfloat16)
    params = sum(p.numel() for p in ours.parameters())
    assert abs(params / 1e9 - architectures()["qwen-image"]["params_b"]) < 0.2
    assert bench.grid(ours.cfg, 1328, 1328) == (83, 83)  # 6889 image tokens


@pytest.fixture
def shrunk(monkeypatch):
    shrink(monkeypatch, bench, SHRUNK)


def test_bench_step_runs_and_guards_on_cpu(shrunk):
    row = bench.bench_step(height=128, width=96, txt_len=16, device="cpu", compiled=False)
    assert row["shape"] == "96x128, 48+16 tokens"
    assert 0 < row["rel_l2_eager"] <= bench.GUARD_REL_L2 and row["guard_ok"]
    assert set(row["rel_l2_block_update_eager"]) == {"first", "last"}
    assert max(row["rel_l2_block_update_eager"].values()) <= bench.GUARD_REL_L2
    assert row["ditserve_eager_step_s"] > 0 and row["diffusers_eager_step_s"] > 0
    assert row["speedup_vs_diffusers_eager"] == pytest.approx(
        row["diffusers_eager_step_s"] / row["ditserve_eager_step_s"])


def _no_rope(dit):
    """MSRoPE dropped: queries and keys normalised but not rotated."""
    def qkv(parts, rope, heads):
        return norm_rope_qkv(parts, Rotary(torch.ones_like(rope.cos), torch.zeros_like(rope.sin)), heads)

    for block in dit.blocks:
        block.qkv_op = qkv


def test_guard_catches_wrong_block_math(shrunk):
    """The block-update guard is not vacuous: transposed positions, dropped MSRoPE, swapped streams or
    another block's weights fail it, where the whole-output rel L2 (dominated by the input projection)
    barely moves."""
    ref, ours = bench.build(device="cpu")
    inp = bench.inputs(ours.cfg, 64, 96, 8, "cpu", torch.bfloat16)
    grids = [bench.grid(ours.cfg, 64, 96)]
    with torch.no_grad():
        assert max(bench.block_update_rel_l2(ref, ours, inp, grids).values()) <= bench.GUARD_REL_L2
        transposed = dataclasses.replace(inp, img_ids=inp.img_ids[:, [0, 2, 1]])
        assert min(bench.block_update_rel_l2(ref, ours, transposed, grids).values()) > 3 * bench.GUARD_REL_L2
        _no_rope(ours)
        assert min(bench.block_update_rel_l2(ref, ours, inp, grids).values()) > 3 * bench.GUARD_REL_L2
        for block in ours.blocks:
            block.qkv_op = norm_rope_qkv
        first, last = ours.blocks[0], ours.blocks[-1]
        first.img_attn, first.txt_attn = first.txt_attn, first.img_attn
        assert bench.block_update_rel_l2(ref, ours, inp, grids)["first"] > 10 * bench.GUARD_REL_L2
        last.img_mlp = first.img_mlp  # another block's MLP
        assert bench.block_update_rel_l2(ref, ours, inp, grids)["last"] > 10 * bench.GUARD_REL_L2


@pytest.mark.parametrize("spoil,bf16_ok,fp8_ok", [(None, True, True), (_no_rope, False, True),
                                                  (fp8_biases_lost, True, False)])
def test_fast_and_fp8_blocks_are_judged_against_float32(shrunk, monkeypatch, spoil, bf16_ok, fp8_ok):
    """The compiled and fp8 paths' block updates are judged against diffusers' blocks in float32: a right fast
    path passes, one without MSRoPE fails the bf16 bound; fp8 blocks pass their own bound, and a broken fp8
    linear fails it. The fast path here: fp8 linears on the CPU, no compile."""
    stand_in_accel(monkeypatch, spoil)
    row = bench.bench_step(height=64, width=96, txt_len=8, device="cpu", quantization="fp8", compare=False)
    assert row["guard_ok"] is bf16_ok and row["fp8_guard_ok"] is fp8_ok
    assert row["ditserve_step_s"] > 0 and row["ditserve_fp8_step_s"] > 0 and row["fp8_floor_step_s"] > 0
    bound = row["fast_block_bound"]
    assert all(bench.FAST_BLOCK_GUARD <= b < 2 * bench.FAST_BLOCK_GUARD for b in bound.values())
    if spoil is None:
        assert row["rel_l2_block_update_fp32"] == pytest.approx(row["block_update_floor"], rel=1e-2)  # no compile
        assert row["fp8_rel_l2_vs_diffusers_bf16"] <= bench.FP8_GUARD_REL_L2
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) <= FP8_BLOCK_GUARD
    elif spoil is _no_rope:
        assert all(row["rel_l2_block_update_fp32"][k] > bound[k] for k in bound)
    else:
        assert max(row["fp8_rel_l2_block_update_fp32"].values()) > 5 * FP8_BLOCK_GUARD


def test_fp8_attention_variant_is_run_and_judged(shrunk, monkeypatch):
    """`attention="fp8"` adds a compiled variant with fp8 linears and the fp8 attention backend (here its
    numerics emulated on the CPU): its own timing, error and guard, beside the fp8-linears-only variant;
    with diffusers compiled in the row, each variant's speed-up against it."""
    stand_in_accel(monkeypatch)
    monkeypatch.setattr(bench, "compile_diffusers", lambda ref: None)  # diffusers eager stands in on the CPU
    row = bench.bench_step(height=64, width=96, txt_len=8, device="cpu", quantization="fp8", attention="fp8")
    assert row["fp8_attention"] == "auto" and row["fp8_attn_attention"] == "fp8"
    assert row["ditserve_fp8_attn_step_s"] > 0 and row["fp8_guard_ok"] and row["fp8_attn_guard_ok"]
    # e4m3 q, k, v and P: not the fp8-linears-only output, but close to it
    assert row["fp8_attn_rel_l2_vs_diffusers_bf16"] != row["fp8_rel_l2_vs_diffusers_bf16"]
    assert row["fp8_attn_rel_l2_vs_diffusers_bf16"] < 3 * row["fp8_rel_l2_vs_diffusers_bf16"] + 1e-2
    for prefix in ("", "fp8_", "fp8_attn_"):
        assert row[f"{prefix}speedup_vs_diffusers_compiled"] == pytest.approx(
            row["diffusers_compiled_step_s"] / row[f"ditserve_{prefix}step_s"])


def test_step_flops_counts_the_matmuls(shrunk):
    _, ours = bench.build(device="cpu", dtype=torch.float32)
    inp = bench.inputs(ours.cfg, 128, 128, 16, "cpu", torch.float32)
    for block in ours.blocks:  # attention as plain matmuls, which the counter sees on any device
        block.attn_op = lambda q, k, v: (q.transpose(1, 2) @ k.transpose(1, 2).mT / q.shape[-1] ** 0.5
                                         ).softmax(-1).matmul(v.transpose(1, 2)).transpose(1, 2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ours(inp)
    expected = bench.step_flops(ours.cfg, inp.img.shape[1], 16)
    # the formula leaves out the embeddings and the head (a few % at this toy width, ~0 at real size)
    assert expected < counter.get_total_flops() < 1.1 * expected


@pytest.mark.parametrize("extra,needle", [([], "needs a CUDA GPU"), (["--end-to-end"], "DiT step only"),
                                          (["--quantization", "fp8", "--attention-backend", "fp8"],
                                           "needs a CUDA GPU")])
def test_cli_dispatches_qwen_image(capsys, extra, needle):
    """Only --end-to-end is refused; fp8 linears and another attention backend reach the step bench."""
    if torch.cuda.is_available() and "--end-to-end" not in extra:
        pytest.skip("a GPU is present: the bench would really run")
    assert main(["bench", "--model", "qwen-image", *extra]) == 2
    assert needle in capsys.readouterr().err


def test_cli_passes_quantization_and_attention(monkeypatch, capsys):
    """--quantization and --attention-backend reach the Qwen-Image step bench (a GPU faked, the bench stubbed)."""
    seen = {}

    def fake(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return {"model": args[0]}

    monkeypatch.setattr(bench, "bench_step", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["bench", "--model", "qwen-image", "--quantization", "fp8", "--attention-backend", "fp8"]) == 0
    assert seen["args"] == ("qwen-image", 1328, 1328)
    assert seen["kwargs"] == {"quantization": "fp8", "compare": True, "attention": "fp8"}
    assert '"model": "qwen-image"' in capsys.readouterr().out
