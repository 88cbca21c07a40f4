"""The Qwen-Image GPU step bench, run on the CPU: the real architecture maps onto our DiT (on the
meta device, no memory), and a shrunken one goes through `bench_step` end to end."""

import dataclasses

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from tiny.bench import shrink
from torch.utils.flop_counter import FlopCounterMode

from ditserve.bench import qwen_image as bench
from ditserve.bench.common import arch_kwargs, architectures
from ditserve.cli.main import main
from ditserve.models.common.loading import assign_mapped
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
    assert row["rel_l2_block0_update"] <= bench.GUARD_REL_L2
    assert row["ditserve_eager_step_s"] > 0 and row["diffusers_eager_step_s"] > 0
    assert row["speedup_vs_diffusers_eager"] == pytest.approx(
        row["diffusers_eager_step_s"] / row["ditserve_eager_step_s"])


def test_guard_catches_wrong_block_math(shrunk):
    """The block-update guard is not vacuous: swapped streams or transposed positions fail it,
    where the whole-output rel L2 (dominated by the input projection) barely moves."""
    ref, ours = bench.build(device="cpu")
    inp = bench.inputs(ours.cfg, 64, 96, 8, "cpu", torch.bfloat16)
    grids = [bench.grid(ours.cfg, 64, 96)]
    with torch.no_grad():
        assert bench.block_update_rel_l2(ref, ours, inp, grids) <= bench.GUARD_REL_L2
        transposed = dataclasses.replace(inp, img_ids=inp.img_ids[:, [0, 2, 1]])
        assert bench.block_update_rel_l2(ref, ours, transposed, grids) > 3 * bench.GUARD_REL_L2
        block = ours.blocks[0]
        block.img_attn, block.txt_attn = block.txt_attn, block.img_attn
        assert bench.block_update_rel_l2(ref, ours, inp, grids) > 10 * bench.GUARD_REL_L2


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


@pytest.mark.parametrize("extra,needle", [([], "needs a CUDA GPU"), (["--end-to-end"], "bf16 DiT step only"),
                                          (["--quantization", "fp8"], "bf16 DiT step only"),
                                          (["--attention-backend", "fp8"], "bf16 DiT step only")])
def test_cli_dispatches_qwen_image(capsys, extra, needle):
    if torch.cuda.is_available() and not extra:
        pytest.skip("a GPU is present: the bench would really run")
    assert main(["bench", "--model", "qwen-image", *extra]) == 2
    assert needle in capsys.readouterr().err
