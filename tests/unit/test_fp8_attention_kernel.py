"""The 8-bit attention kernels (ditserve.accel.fp8_attention) in Triton's CPU interpreter.

Each check runs in a child process, because TRITON_INTERPRET must be set before Triton is imported.
The same checks run at full size on the GPU in tests/gpu/test_fp8_attention_cuda.py.

The interpreter has two bugs that would hide or fake kernel errors, so INTERPRETER_FIXES patches
them in the child and nowhere else. The kernels are left as the GPU runs them.
  - fp32 -> e4m3 rounding: a mantissa that rounds up carries into the wrong exponent bit
    (125.5 -> 64, -31 -> -16), and values above 448 become NaN. This doubles the kernel's error.
    The patch rounds as the GPU's cvt.rn.satfinite does, through torch.
  - bf16 tl.dot multiplies the raw bits (int16 matmul) and gets garbage. The patch widens bf16
    operands to fp32 first. It also rounds fp32 -> bf16 to nearest even; the interpreter truncates.
8-bit tl.dot itself works: the interpreter upcasts e4m3 to fp16 and int8 to int32 exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

INTERPRETER_FIXES = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter as ti

    _convert, _dot = ti._convert_float, ti.InterpreterBuilder.create_dot
    _NARROW = {tl.float8e4nv: (torch.float8_e4m3fn, torch.uint8), tl.bfloat16: (torch.bfloat16, torch.int16)}

    def _convert_float(x, src, dst, rounding):
        if src == tl.float32 and dst in _NARROW:
            t = torch.from_numpy(np.ascontiguousarray(x).view(np.float32))
            if dst == tl.float8e4nv:
                t = t.clamp(-448.0, 448.0)  # satfinite
            dtype, bits = _NARROW[dst]
            return t.to(dtype).view(bits).numpy().reshape(x.shape)
        return _convert(x, src, dst, rounding)

    def _widen(h):
        if h.dtype != tl.bfloat16:
            return h
        return ti.TensorHandle(_convert(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, *args):
        return _dot(self, _widen(a), _widen(b), d, *args)

    ti._convert_float, ti.InterpreterBuilder.create_dot = _convert_float, create_dot
""")

COMMON = INTERPRETER_FIXES + textwrap.dedent("""
    import math
    from ditserve.accel import fp8_attention as fa

    def reference(q, k, v):
        q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return (p @ v).transpose(1, 2)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    def inputs(b, s, h, d, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(b, s, h, d, generator=g).bfloat16() for _ in range(3)]
""")

QUANTIZER = COMMON + textwrap.dedent("""
    b, s, h, d = 2, 200, 2, 64
    q, k, v = inputs(b, s, h, d)
    k = k + torch.randn(1, 1, h, d).bfloat16() * 3  # a channel offset for the smoothing to remove
    pad = fa._padded(s)
    for qk_int8 in (True, False):
        x = fa.quantize(q, k, v, qk_int8=qk_int8)
        assert x.q8.shape == (b, h, pad, d) and x.k8.shape == (b, h, pad, d) and x.vt8.shape == (b, h, d, pad)
        for padding in (x.q8[:, :, s:], x.k8[:, :, s:], x.vt8[..., s:]):
            assert not padding.float().abs().any(), "padding must be zeros"
        qmax = 127.0 if qk_int8 else 448.0

        def check(got_int, scale, want):  # scale broadcasts over got_int; error within one rounding
            got = got_int.double() * scale
            half = 0.5 * scale if qk_int8 else 2.0**-4 * want.abs() + 2.0**-10 * scale
            assert bool(((got - want).abs() <= half * 1.0001 + 1e-7).all()), float((got - want).abs().max())

        q_true = q.double().transpose(1, 2)  # [B, H, S, D]
        q_unit = x.q_scale[..., :s, None].double() / (fa.LOG2_E / math.sqrt(d))
        check(x.q8[:, :, :s], q_unit, q_true)
        assert torch.allclose(x.q_scale[..., :s] / (fa.LOG2_E / math.sqrt(d)) * qmax,
                              q_true.abs().amax(-1).float(), rtol=1e-5)
        k_mean = k.double().mean(1)  # over tokens, per (batch, head, channel)
        assert torch.allclose(x.k_mean.double(), k_mean, atol=1e-5)
        smooth = (k.double() - k_mean[:, None]).transpose(1, 2)
        blocks = x.k_scale.double().repeat_interleave(fa.PAD, -1)[..., :s, None]
        check(x.k8[:, :, :s], blocks, smooth)
        assert torch.allclose(x.k_scale.double() * qmax, torch.stack(
            [smooth[:, :, i:i + fa.PAD].abs().amax((-1, -2)) for i in range(0, s, fa.PAD)], -1), rtol=1e-5)
        v_got = x.vt8[..., :s].double().transpose(-1, -2) * x.v_scale.double()[:, :, None]
        v_true = v.double().transpose(1, 2)
        assert bool(((v_got - v_true).abs() <= 2.0**-4 * v_true.abs() + 2.0**-10 * x.v_scale[:, :, None] + 1e-7).all())
        # smoothing leaves every query's softmax over the keys unchanged
        before = torch.softmax(q_true @ k.double().transpose(1, 2).transpose(-1, -2), -1)
        after = torch.softmax(q_true @ smooth.transpose(-1, -2), -1)
        assert torch.allclose(before, after, atol=1e-12)
    print("ok")
""")

ATTENTION = COMMON + textwrap.dedent("""
    # (qk_int8, pv_fp8) -> bound on rel. L2 vs fp32 attention; measured here ≈ 3.5e-2, 5.1e-2, 1.1e-2
    # (e4m3 rounding of P and V alone gives ≈ 2.6e-2 each on near-uniform attention)
    BOUNDS = {(True, True): 5e-2, (False, True): 7e-2, (True, False): 2e-2}
    b, s, h, d = {shape}
    configs = {configs}
    q, k, v = inputs(b, s, h, d, seed=s)
    ref = reference(q, k, v)
    shuffled = rel(reference(q, k[:, torch.randperm(s)], v), ref)  # keys no longer match values
    for (qk_int8, pv_fp8), bound in BOUNDS.items():
        x = fa.quantize(q, k, v, qk_int8, pv_fp8)
        outs = [fa.attend(x, v, s, s, q.dtype, cfg, pv_fp8) for cfg in configs]
        for cfg, out in zip(configs, outs):
            assert out.shape == q.shape and out.dtype == q.dtype
            err = rel(out, ref)
            assert err < bound and err < 0.1 * shuffled, (qk_int8, pv_fp8, cfg, err, shuffled)
            same_tiles = outs[[c[:2] for c in configs].index(cfg[:2])]
            assert torch.equal(out, same_tiles), cfg  # TMA or pointers: the same arithmetic
        if s % fa.PAD and pv_fp8:  # the kernel told that the zero padding keys are real: the tail mask matters
            unmasked = rel(fa.attend(x, v, s, fa._padded(s), q.dtype), ref)  # ≈ 0.15 for 28 fake keys
            assert unmasked > 1.5 * bound, unmasked
    print("ok")
""")

COMPILED = COMMON + textwrap.dedent("""
    q, k, v = inputs(1, 100, 2, 32)

    def layer(q, k, v):
        return fa.fp8_attention_op(q * 1.5, k, v, block_m=64, block_n=32, num_warps=4).float().sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # checks the fake and the schema
    assert torch.equal(compiled(q, k, v), layer(q, k, v))
    print("ok")
""")


def _run(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_quantizer_round_trips_within_one_rounding_and_smoothing_keeps_softmax():
    _run(QUANTIZER)


SMALL = "[fa.KernelConfig(64, 32, 4, 2), fa.KernelConfig(64, 32, 4, 2, tma=True), fa.KernelConfig(32, 64, 4, 2)]"
DEFAULT = "[fa.DEFAULT, fa.KernelConfig(tma=True)]"


# (batch, tokens, heads, head dim): one partial key block, several blocks with a tail, no tail;
# small tiles to cross block edges, and the default 128 x 128 tiles on a ragged length
@pytest.mark.parametrize("shape,configs", [((1, 64, 2, 32), SMALL), ((2, 100, 2, 64), SMALL),
                                           ((1, 200, 2, 32), SMALL), ((1, 200, 2, 32), DEFAULT)])
def test_attention_matches_reference_in_interpreter(shape, configs):
    _run(ATTENTION.replace("{shape}", str(shape)).replace("{configs}", configs))


def test_custom_op_traces_with_fullgraph_compile():
    _run(COMPILED)
