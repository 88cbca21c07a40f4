"""Fused kernels on the GPU against the reference ops, alone and inside compiled blocks (skipped
without CUDA; CI has none). Run first on the device machine: python3 -m pytest -q tests/gpu

The fused kernels stay off by default until these pass there (see benchmarks/NOTES.md).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _norms(dh, dtype, n=2):
    from ditserve.models.common.mmdit import QKNorm

    norms = [QKNorm(dh).cuda().to(dtype) for _ in range(n)]
    for norm in norms:
        for p in norm.parameters():
            p.data.normal_()
    return norms


# (batch, text tokens, image tokens, heads, head dim): odd sizes, FLUX.1-dev's (sizes divisible by
# 16, batch 1) and the demo model's (head dim 32, batch 4)
SHAPES = [(2, 77, 300, 24, 128), (1, 512, 4096, 24, 128), (4, 16, 16, 4, 32)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_norm_rope_matches_reference(dtype, shape):
    from ditserve.accel.qk_rope import triton_norm_rope_qkv
    from ditserve.models.common.mmdit import norm_rope_qkv
    from ditserve.models.common.rope import Rotary, rope_tables

    b, t, n, heads, dh = shape
    torch.manual_seed(0)
    norms = _norms(dh, dtype)
    wide = torch.randn(b, n, 7 * heads * dh, device="cuda", dtype=dtype)  # a slice, as the single block's
    txt, img = torch.randn(b, t, 3 * heads * dh, device="cuda", dtype=dtype), wide[..., : 3 * heads * dh]
    axes = (dh // 8, 7 * dh // 16, 7 * dh // 16)
    pe = rope_tables(torch.randint(0, 64, (t + n, 3), device="cuda").float(), axes, 10000.0)
    with torch.no_grad():
        for parts, table in (([(txt, norms[0]), (img, norms[1])], pe),
                             ([(img, norms[1])], Rotary(pe.cos[:n], pe.sin[:n]))):
            for r, g in zip(norm_rope_qkv(parts, table, heads), triton_norm_rope_qkv(parts, table, heads)):
                rel = float((r.float() - g.float()).norm() / r.float().norm())
                assert rel < (1e-6 if dtype == torch.float32 else 8e-3), (shape, rel)


def _flux_blocks(dh=128, heads=4):
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.model import FluxDiT

    cfg = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=dh, num_attention_heads=heads,
                     joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(dh // 8, 7 * dh // 16, 7 * dh // 16))
    torch.manual_seed(0)
    with torch.device("cuda"):
        return FluxDiT(cfg).to(torch.bfloat16).eval()


@pytest.mark.parametrize("quantization", [None, "fp8"])
@pytest.mark.parametrize("compile_, fused, rows", [(False, True, False), (True, False, False), (True, True, False),
                                                  (True, True, True)])
@pytest.mark.parametrize("dh, heads", [(128, 4), (32, 4)])
def test_compiled_blocks_with_fused_kernels_match_eager(quantization, compile_, fused, rows, dh, heads, monkeypatch):
    """What the bench's block guard flagged on 2026-11-21: the fast paths (fused kernels, compile,
    both, and row fusion: the fp8 quantiser inside inductor's persistent producer kernels) against the
    eager reference blocks, update by update; each path alone tells which breaks."""
    import torch._inductor.config as inductor

    from ditserve.accel import accelerate_dit
    from ditserve.accel.fp8 import apply_fp8
    from ditserve.config import AccelConfig
    from ditserve.pipelines.flux import image_ids

    ref = _flux_blocks(dh, heads)
    if quantization == "fp8":  # the eager fp8 blocks: the fast paths must not add error of their own
        ref = apply_fp8(ref)
    # small streams: the update is then not lost in the bf16 rounding of the residual sum
    dim = dh * heads
    img = torch.randn(1, 1024, dim, device="cuda", dtype=torch.bfloat16) * 0.01
    txt = torch.randn(1, 128, dim, device="cuda", dtype=torch.bfloat16) * 0.01
    vec = torch.randn(1, dim, device="cuda", dtype=torch.bfloat16)
    ids = torch.cat([torch.zeros(128, 3, device="cuda"), image_ids(32, 32, "cuda", torch.float32)])
    pe = ref.positional_tables(ids[128:], ids[:128])
    if hasattr(inductor, "inductor_choices_class"):  # row fusion sets it for the process: restored after
        monkeypatch.setattr(inductor, "inductor_choices_class", None)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = [block(img, txt, vec, pe)[0] - img for block in ref.blocks]
        fast = accelerate_dit(_flux_blocks(dh, heads), AccelConfig(compile=compile_, cuda_graphs=False,
                                                                   quantization=quantization, fused_kernels=fused,
                                                                   row_fusion=rows),
                              torch.device("cuda"))
        got = [block(img, txt, vec, pe)[0] - img for block in fast.blocks]
    # compiled vs eager bf16: ≈ 7e-3 on the CPU. fp8: a last-bit bf16 difference before quantising
    # moves a value to the next e4m3 step (1/16), so any fast path differs from eager fp8 by a few %
    # (H200, 2026-11-21: 2.6e-3..4.5e-2; eager fp8 vs eager bf16: 6.5e-2); wrong math gives O(1)
    bound = 2e-2 if quantization is None else 6e-2
    rels = [float((g.float() - e.float()).norm() / e.float().norm()) for e, g in zip(expected, got)]
    print(f"blocks dh={dh} quant={quantization} compile={compile_} fused={fused} rows={rows}: update rel L2 {rels}")
    assert max(rels) < bound, rels


def test_triton_fp8_quantisation_equals_torch():
    from ditserve.accel.fp8 import quantize_rows, quantize_rows_fp8

    torch.manual_seed(0)
    for k in (64, 3072, 15360):
        x = torch.randn(333, k, device="cuda", dtype=torch.bfloat16) * torch.rand(333, 1, device="cuda") * 10
        q_ref, s_ref = quantize_rows(x)
        q, s = quantize_rows_fp8(x)
        assert torch.equal(s, s_ref), (k, float((s - s_ref).abs().max()))
        differ = int((q.float() != q_ref.float()).sum())
        assert differ == 0, (k, differ, x.numel())


@pytest.mark.parametrize("k", [3072, 12288])
def test_fp8_fast_accumulation_stays_near_the_promoted_sum(k):
    """FP8Linear with cuBLASLt's fast accumulation against the same layer with promotion, at FLUX's widths
    (the feed-forward's second GEMM sums 12,288 products): both against the float32 product of the same
    e4m3 operands, so only the accumulation differs."""
    from torch import nn

    from ditserve.accel.fp8 import FP8Linear, quantize_rows

    torch.manual_seed(0)
    linear = nn.Linear(k, 3072, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, k, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        x_q, x_s = quantize_rows(x)
        w_q, w_s = quantize_rows(linear.weight)
        exact = (x_q.float() * x_s) @ (w_q.float() * w_s).t() + linear.bias.float()
        errors = {}
        for fast in (False, True):
            out = FP8Linear(linear, fast_accum=fast)(x).float()
            errors[fast] = float((out - exact).norm() / exact.norm())
    print(f"k={k}: rel L2 against the float32 sum: promoted {errors[False]:.2e}, fast {errors[True]:.2e}")
    assert errors[False] < 4e-3  # bf16 output rounding (2^-9) dominates
    assert errors[True] < 1e-2


@pytest.mark.parametrize("group_size", [None, 1])
def test_segment_graphs_replay_the_eager_forward(group_size):
    """Embed, block groups and head replayed from CUDA graphs equal the eager forward, at two input
    shapes (one graph set each) and after the inputs change in place between replays."""
    from dataclasses import replace

    from ditserve.accel.segments import SegmentedDiT
    from ditserve.models.flux.model import FluxInputs
    from ditserve.pipelines.flux import image_ids

    dit = _flux_blocks(64, 4)
    graphed = SegmentedDiT(dit, graphs=True, group_size=group_size)
    for h2, w2, t in ((8, 8, 16), (8, 12, 16)):
        g = torch.Generator("cuda").manual_seed(h2 * w2)
        def inputs(seed_shift):
            return FluxInputs(img=torch.randn(2, h2 * w2, 64, device="cuda", dtype=torch.bfloat16, generator=g),
                              txt=torch.randn(2, t, 64, device="cuda", dtype=torch.bfloat16, generator=g),
                              pooled=torch.randn(2, 32, device="cuda", dtype=torch.bfloat16, generator=g),
                              timesteps=torch.full((2,), 0.3 + seed_shift, device="cuda"),
                              img_ids=image_ids(h2, w2, "cuda", torch.bfloat16),
                              txt_ids=torch.zeros(t, 3, device="cuda", dtype=torch.bfloat16))
        for shift in (0.0, 0.4):
            inp = inputs(shift)
            inp = replace(inp, rope=dit.positional_tables(inp.img_ids, inp.txt_ids))
            with torch.no_grad():
                expected, got = dit(inp), graphed(inp)
            assert torch.equal(got, expected), float((got.float() - expected.float()).abs().max())
    assert all(len(fn.graphs) == 2 for fn in graphed.group_fns)
