"""Fused kernels on the GPU against the reference ops (skipped without CUDA; CI has none).

Run on the device machine: python3 -m pytest -q tests/gpu
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_rope_matches_reference(dtype):
    from ditserve.accel.qk_rope import triton_norm_rope_qkv
    from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
    from ditserve.models.common.rope import rope_tables

    torch.manual_seed(0)
    heads, dh = 24, 128
    norms = [QKNorm(dh).cuda().to(dtype), QKNorm(dh).cuda().to(dtype)]
    for n in norms:
        for p in n.parameters():
            p.data.normal_()
    wide = torch.randn(2, 300, 7 * heads * dh, device="cuda", dtype=dtype)
    txt, img = torch.randn(2, 77, 3 * heads * dh, device="cuda", dtype=dtype), wide[..., : 3 * heads * dh]
    pe = rope_tables(torch.randint(0, 64, (377, 3), device="cuda").float(), (16, 56, 56), 10000.0)
    with torch.no_grad():
        ref = norm_rope_qkv([(txt, norms[0]), (img, norms[1])], pe, heads)
        got = triton_norm_rope_qkv([(txt, norms[0]), (img, norms[1])], pe, heads)
    for r, g in zip(ref, got):
        rel = float((r.float() - g.float()).norm() / r.float().norm())
        assert rel < (1e-6 if dtype == torch.float32 else 8e-3), rel


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
