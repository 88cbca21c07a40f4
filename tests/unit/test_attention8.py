"""The "fp8" attention backend (ditserve/accel/attention8.py) on CPU: its Triton quantisation
kernels equal the torch emulation bit for bit (through Triton's CPU interpreter, in a child process:
TRITON_INTERPRET must be set before Triton is imported), the emulated numerics stay within the
bound benchmarks/attention8_numerics.py found, and the backend's selection on CPU falls back to SDPA.
The cuDNN path itself is checked on the GPU (tests/gpu/test_attention8_cuda.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

KERNELS = textwrap.dedent("""
    import torch
    from ditserve.accel import attention8 as a8

    a8.PART_BLOCK = 16  # several partial-reduction steps even at these sizes
    torch.manual_seed(0)
    a8.BLOCK_T = 16
    for shape, target in (((2, 37, 3, 16), 512), ((1, 170, 2, 32), 4096)):
        a8.TARGET_PROGRAMS = target  # 4096: many token ranges per head, > PART_BLOCK partials
        wide = torch.randn(shape[:-1] + (3 * shape[-1],))
        wide = wide * torch.exp2(torch.randint(-14, 6, wide.shape).float())  # subnormal e4m3 to 32
        wide[..., 1] += 3.0  # a shared offset in one channel, as k and v carry
        x = wide.to(torch.bfloat16)[..., shape[-1]:2 * shape[-1]]  # a strided slice
        for smooth in (False, True):
            x8, descale, mean = a8.quantize_fp8(x, smooth)
            ref8, scale, ref_mean = a8.quantize_reference(x, smooth, mean=mean)
            assert torch.equal(descale.reshape(()), 1.0 / scale), (descale, scale)
            assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8)), shape
            if smooth:  # the kernel's mean differs from torch's only in summation order
                own = a8.quantize_reference(x, True)
                assert torch.allclose(mean, own[2], rtol=1e-5, atol=1e-6)
                a, b = x8.float(), own[0].float()  # at most one e4m3 ulp apart
                assert bool(((a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0 ** -9).all())
                out = a8.dequantize_out(x8, descale, mean, torch.float32)
                assert torch.equal(out, x8.float() * descale.reshape(()) + mean[:, None])
                out = a8.dequantize_out(x.contiguous(), descale, mean, torch.float32)  # bf16 O path
                assert torch.equal(out, x.float() + mean[:, None])  # (the interpreter's bf16 cast truncates)
    print("ok")
""")


def test_quantise_kernels_match_emulation_in_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", KERNELS], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_pow2_scale_is_the_largest_power_of_two_under_448():
    from ditserve.accel.attention8 import pow2_scale

    for bound, scale in ((448.0, 1.0), (448.5, 0.5), (1.0, 256.0), (1.75, 256.0), (1.7500001, 128.0),
                         (3e-3, 2.0 ** 17), (0.0, 2.0 ** 100)):
        assert float(pow2_scale(torch.tensor(bound))) == scale, bound


def _dit_like(b, s, h, d, seed):
    """RMS-normed q, k with uneven weights and outlier channels, a shared component in k and v."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(b, s, 1, 16, generator=g)

    def proj(bias):
        x = latent @ torch.randn(16, d, generator=g) / 4 + 0.5 * torch.randn(b, s, h, d, generator=g)
        x[..., :2] *= 6.0
        return x + bias * torch.randn(1, 1, h, d, generator=g)

    def norm(x):
        w = 0.8 * torch.exp(0.3 * torch.randn(h, d, generator=g))  # logit std ~0.9: diffuse
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w

    return norm(proj(0.5)).bfloat16(), norm(proj(2.0)).bfloat16(), proj(0.7).bfloat16()


def _exact(q, k, v):
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (p @ v).transpose(1, 2)


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_emulated_backend_within_the_studied_bound():
    from ditserve.accel.attention8 import attention_reference, fp8_attention_emulated

    q, k, v = _dit_like(2, 576, 2, 128, seed=0)
    ref = _exact(q, k, v)
    err = _rel(attention_reference(q, k, v), ref)
    # the study's diffuse DiT-like regime: 0.9e-2 at 4096 tokens (1.6e-2 here at 576); per-tensor
    # fp8 without smoothing 2.8e-2 (3.0e-2 here). Moderate and peaky heads do worse (see the study).
    assert err < 2e-2, err
    assert _rel(fp8_attention_emulated(q, k, v), ref) == err
    # the smoothing is what keeps it there: the same with no mean to remove is no better
    naive = _naive_fp8(q, k, v)
    assert _rel(naive, ref) > 1.5 * err, (_rel(naive, ref), err)


def _naive_fp8(q, k, v):
    """Per-tensor e4m3 q, k, v, P and O without smoothing (the H200 bench's quantisation)."""
    def fp8(x):
        s = 448.0 / x.float().abs().amax()
        return (x.float() * s).to(torch.float8_e4m3fn).float() / s

    qf, kf, vf = (fp8(t).transpose(1, 2) for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    o = (p * 448).to(torch.float8_e4m3fn).float() @ vf / (p.sum(-1, keepdim=True) * 448)
    so = 448.0 / vf.abs().amax()
    return ((o * so).to(torch.float8_e4m3fn).float() / so).transpose(1, 2)


def test_mask_takes_sdpa():
    from ditserve.accel.attention8 import fp8_attention, fp8_attention_emulated
    from ditserve.models.common.attention import sdpa_attention

    q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[:, -2:] = False
    for op in (fp8_attention, fp8_attention_emulated):
        assert torch.equal(op(q, k, v, mask=mask), sdpa_attention(q, k, v, mask=mask))


def test_head_dims_the_kernels_lack_take_sdpa_in_the_emulation_too():
    """The CPU quality rows (benchmarks/cache_quality.py --fp8-attention) see what the GPU op does."""
    from ditserve.accel.attention8 import fp8_attention_emulated
    from ditserve.models.common.attention import sdpa_attention

    for d in (24, 512):  # not a power of two; past cuDNN's 256
        q, k, v = (torch.randn(1, 8, 2, d) for _ in range(3))
        assert torch.equal(fp8_attention_emulated(q, k, v), sdpa_attention(q, k, v))
    q, k, v = (torch.randn(1, 8, 2, 32) for _ in range(3))
    assert not torch.equal(fp8_attention_emulated(q, k, v), sdpa_attention(q, k, v))


def test_selection_on_cpu_falls_back_to_sdpa():
    from ditserve.accel.attention import BACKENDS, select_attention
    from ditserve.accel.attention8 import unsupported_reason
    from ditserve.config.engine import AccelConfig
    from ditserve.models.common.attention import sdpa_attention

    assert "fp8" in BACKENDS
    assert select_attention("fp8", torch.device("cpu")) is sdpa_attention
    assert unsupported_reason(torch.device("cpu")) == "needs a CUDA GPU"
    assert AccelConfig(attention="fp8").attention == "fp8"
