"""The "fp8" attention backend on the GPU (skipped without CUDA, cuDNN frontend or Hopper): the native
e4m3 casts of the quantise and epilogue kernels equal torch's, cuDNN's fp8 SDPA agrees with the CPU
emulation, the whole op stays near bf16 SDPA, and it runs inside torch.compile and a CUDA graph.
On the device machine: python3 -m pytest -q tests/gpu/test_attention8_cuda.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _needs_fp8():
    from ditserve.accel.attention8 import unsupported_reason

    reason = unsupported_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _dit_like(b, s, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def normed(bias):
        x = torch.randn(b, s, h, d, device="cuda", generator=g) + bias * torch.randn(1, 1, h, d, device="cuda", generator=g)
        w = 0.8 * torch.exp(0.3 * torch.randn(h, d, device="cuda", generator=g))
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w).bfloat16()

    v = torch.randn(b, s, h, d, device="cuda", generator=g) + 0.7 * torch.randn(1, 1, h, d, device="cuda", generator=g)
    return normed(0.5), normed(2.0), v.bfloat16()


@pytest.mark.parametrize("shape", [(2, 77, 3, 64), (1, 4608, 24, 128)])
def test_native_casts_match_torch(shape):
    pytest.importorskip("triton")
    from ditserve.accel import attention8 as a8

    torch.manual_seed(0)
    x = (torch.randn(shape, device="cuda") * torch.exp2(torch.randint(-14, 6, shape, device="cuda").float()))
    x[..., 1] += 3.0
    x = x.bfloat16()
    for smooth in (False, True):
        x8, descale, mean = a8.quantize_fp8(x, smooth)
        ref8, scale, _ = a8.quantize_reference(x, smooth, mean=mean)
        assert torch.equal(descale.reshape(()), 1.0 / scale)
        assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8))
        if smooth:
            out = a8.dequantize_out(x8, descale, mean, torch.float32)
            assert torch.equal(out, x8.float() * descale.reshape(()) + mean[:, None])


def test_cudnn_matches_emulation_and_stays_near_sdpa():
    _needs_fp8()
    from ditserve.accel import attention8 as a8
    from ditserve.models.common.attention import sdpa_attention

    q, k, v = _dit_like(1, 4608, 4, 128)
    out = a8.fp8_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    fp8_out = a8._graph_for(q, k).fp8_out
    emu = a8.attention_reference(q, k, v, fp8_out=fp8_out)
    ref = sdpa_attention(q, k, v)
    # cuDNN's online softmax rounds P against running maxima: close to, not equal to, the emulation
    assert _rel(out, emu) < 1e-2, _rel(out, emu)
    assert _rel(out, ref) < 2.5e-2, _rel(out, ref)  # the study's diffuse regime: ~1e-2


def test_cross_attention_lengths_and_mask_fallback():
    _needs_fp8()
    from ditserve.accel.attention8 import fp8_attention
    from ditserve.models.common.attention import sdpa_attention

    q, _, _ = _dit_like(2, 1000, 4, 128)
    _, k, v = _dit_like(2, 512, 4, 128, seed=1)
    assert _rel(fp8_attention(q, k, v), sdpa_attention(q, k, v)) < 3e-2
    mask = torch.ones(2, 512, dtype=torch.bool, device="cuda")
    mask[1, 300:] = False
    assert torch.equal(fp8_attention(q, k, v, mask=mask), sdpa_attention(q, k, v, mask=mask))


def test_compiled_and_graphed():
    _needs_fp8()
    from ditserve.accel.attention8 import fp8_attention

    q, k, v = _dit_like(1, 1024, 8, 128)
    eager = fp8_attention(q, k, v)
    compiled = torch.compile(lambda a, b, c: fp8_attention(a, b, c) * 1.0, fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_attention(q, k, v)
    q.copy_(q * 1.5)  # new values, same buffers: scales must follow (no host-side state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fp8_attention(q, k, v))
