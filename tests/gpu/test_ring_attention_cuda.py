"""Ring attention's partial kernel on a real GPU (skipped without CUDA; CI has none): cuDNN's and
flash's output and log-sum-exp agree with the math path, and chunks merged by log-sum-exp give SDPA's
attention over all keys. Run on the device machine: python3 -m pytest -q tests/gpu/test_ring_attention_cuda.py"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ditserve.parallel import attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["cudnn", "flash"])
def kernel(request, monkeypatch):
    monkeypatch.setattr(attention, "_CUDNN_LSE", [request.param == "cudnn"])
    return request.param


def _qkv(keys: int = 1000):
    g = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 777, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, keys, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return q, k, v


def test_fused_partial_matches_the_math_path(kernel):
    q, k, v = _qkv()
    out, lse = attention.attention_lse(q, k, v)
    ref_out, ref_lse = attention.attention_lse(q.float().cpu(), k.float().cpu(), v.float().cpu())
    assert attention._CUDNN_LSE[0] == (kernel == "cudnn")  # the kernel asked for ran (no silent fallback)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.cpu(), ref_out, atol=2e-2, rtol=0)


def test_merged_chunks_give_full_attention(kernel):
    q, k, v = _qkv()
    out = lse = None
    for a, b in ((0, 300), (300, 1000)):
        part, part_lse = attention.attention_lse(q, k[:, a:b], v[:, a:b])
        out, lse = attention.merge_partials(out, lse, part, part_lse)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out.to(q.dtype), expected, atol=2e-2, rtol=0)
