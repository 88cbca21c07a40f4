"""The fused QK-norm + RoPE Triton kernel computes what the model's reference op computes.

Runs the kernel (the custom op itself; the block-level op sends CPU tensors to the reference)
through Triton's CPU interpreter in a child process (TRITON_INTERPRET must be set before Triton is
imported); the same check runs on the GPU in tests/gpu.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    from ditserve.accel.qk_rope import fused_norm_rope_qkv
    from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
    from ditserve.models.common.rope import Rotary, rope_tables

    torch.manual_seed({seed})
    batch, t, n, heads, dh = {shape}
    norms = [QKNorm(dh), QKNorm(dh)]
    for norm in norms:
        for p in norm.parameters():
            p.data = torch.randn_like(p)
    wide = torch.randn(batch, t, 5 * heads * dh)  # a slice of a wider projection: row stride 5*H*Dh
    txt, img = wide[..., : 3 * heads * dh], torch.randn(batch, n, 3 * heads * dh)
    axes = (dh // 4, 3 * dh // 8, 3 * dh // 8)
    pe = rope_tables(torch.randint(0, 9, (t + n, 3)).float(), axes, 10000.0)
    with torch.no_grad():
        for parts, table in (([(txt, norms[0]), (img, norms[1])], pe),
                             ([(txt, norms[0])], Rotary(pe.cos[:t], pe.sin[:t]))):
            ref = norm_rope_qkv(parts, table, heads)
            got = fused_norm_rope_qkv([t for t, _ in parts], [n.q_norm.weight for _, n in parts],
                                      [n.k_norm.weight for _, n in parts], table.cos, table.sin, heads, 1e-6)
            for r, g in zip(ref, got):
                assert g.shape == r.shape, (g.shape, r.shape)
                err = float((r - g).abs().max())
                assert err < 1e-5, err
    print("ok")
""")


# (batch, text tokens, image tokens, heads, head dim): odd sizes with partial token blocks, and
# the demo model's shapes (batch 4, 16 + 16 tokens, 4 heads of 32)
@pytest.mark.parametrize("seed,shape", [(0, (2, 7, 5, 3, 16)), (1, (1, 40, 33, 2, 16)), (2, (4, 16, 16, 4, 32))])
def test_fused_norm_rope_matches_reference_in_interpreter(seed, shape):
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK.format(seed=seed, shape=shape)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_block_op_sends_cpu_tensors_to_the_reference():
    import torch

    from ditserve.accel.qk_rope import triton_norm_rope_qkv
    from ditserve.models.common.mmdit import QKNorm, norm_rope_qkv
    from ditserve.models.common.rope import rope_tables

    torch.manual_seed(0)
    norm, qkv = QKNorm(12), torch.randn(1, 5, 3 * 2 * 12)  # head dim 12: not a power of two either
    pe = rope_tables(torch.randint(0, 9, (5, 3)).float(), (4, 4, 4), 10000.0)
    with torch.no_grad():
        for r, g in zip(norm_rope_qkv([(qkv, norm)], pe, 2), triton_norm_rope_qkv([(qkv, norm)], pe, 2)):
            assert torch.equal(r, g)
