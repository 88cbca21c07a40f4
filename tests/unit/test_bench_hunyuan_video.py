"""The HunyuanVideo GPU step bench, run on the CPU: the real architecture maps onto our DiT (on the meta
device, no memory), and a shrunken one goes through `bench_step` with its guards, which a wrong block fails."""

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from tiny.bench import shrink

from ditserve.bench import hunyuan_video as bench
from ditserve.bench.common import arch_kwargs, architectures
from ditserve.models.common.loading import assign_mapped
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
