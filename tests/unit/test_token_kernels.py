"""The eager per-token Triton kernels (accel/token_kernels.py) compute what the reference ops compute.

The kernels themselves run through Triton's CPU interpreter in a child process (TRITON_INTERPRET must be
set before Triton is imported), on strided views, broadcast and per-token modulation, widths that are
not powers of two, float32 and bf16; the same checks run on the GPU in tests/gpu. The slot functions,
the plan wiring and the in-place chunking run here without Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ditserve.accel.activations import chunked_call
from ditserve.models.common import layers
from ditserve.models.common.rope import apply_rope, rope_tables

CHECK = textwrap.dedent("""
    import torch
    from ditserve.accel import token_kernels as tk
    from ditserve.models.common import layers
    from ditserve.models.common.rope import apply_rope, rope_tables

    torch.manual_seed({seed})
    (batch, length, width), dtype = {shape}, getattr(torch, "{dtype}")

    def close(got, ref, what):
        assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape)
        err = float(((got.float() - ref.float()).abs() / ref.float().abs().clamp(min=1.0)).max())
        assert err <= (1e-5 if dtype == torch.float32 else 2 ** -7), (what, err)

    wide = torch.randn(batch, length + 9, width).to(dtype)
    x = wide[:, 3:3 + length]  # rows of a wider sequence: not contiguous when batch > 1
    scale, shift = torch.randn(batch, 1, width), torch.randn(batch, 1, width)
    close(tk.norm_rows(x, scale, shift, 1e-6, True), layers.norm_modulate(x, scale, shift, 1e-6), "modulate")
    mod = torch.randn(batch, length, 6, width)  # per-token modulation, as TI2V: strided views
    per_scale, per_shift = mod[:, :, 1], mod[:, :, 0]
    close(tk.norm_rows(x, per_scale, per_shift, 1e-6, True), layers.norm_modulate(x, per_scale, per_shift, 1e-6),
          "modulate per token")
    weight, bias = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
    close(tk.norm_rows(x, weight, bias, 1e-5, False), layers.norm_affine(x, weight, bias, 1e-5), "affine")

    gate = torch.randn(batch, 1, width)
    y = torch.randn(batch, length, width).to(dtype)
    ref = layers.gated_add(x, y, gate)
    got = tk.gated_add_rows(x, y, gate)
    assert got.data_ptr() == y.data_ptr()
    close(got, ref, "gated add")

    heads, head_dim = 3, max(8, width // 24 * 8)
    q_all = torch.randn(batch, length + 5, heads, head_dim).to(dtype)
    q = q_all[:, 5:]
    pe = rope_tables(torch.randint(0, 9, (length, 3)), (head_dim // 2, head_dim // 4, head_dim // 4), 10000.0)
    ref = apply_rope(q, pe)
    got = tk.rope_rows(q, pe.cos, pe.sin)
    assert got.data_ptr() == q.data_ptr()
    close(got, ref, "rope")
    print("ok")
""")


# (batch, tokens, width): a width that is not a power of two, a single row per batch, Wan-like widths
@pytest.mark.parametrize("seed,shape,dtype", [(0, (2, 7, 24), "float32"), (1, (1, 33, 48), "float32"),
                                              (2, (3, 1, 20), "float32"), (3, (2, 11, 96), "bfloat16")])
def test_kernels_match_reference_ops_in_interpreter(seed, shape, dtype):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK.format(seed=seed, shape=shape, dtype=dtype)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_slot_functions_send_cpu_tensors_to_the_reference():
    from ditserve.accel import token_kernels as tk

    torch.manual_seed(0)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    scale, shift, gate = torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    w, b = torch.randn(8), torch.randn(8)
    assert torch.equal(tk.norm_modulate(x, scale, shift, 1e-6), layers.norm_modulate(x, scale, shift, 1e-6))
    assert torch.equal(tk.norm_affine(x, w, b, 1e-6), layers.norm_affine(x, w, b, 1e-6))
    expected = layers.gated_add(x, y, gate)
    assert torch.equal(tk.gated_add(x, y, gate), expected)
    q = torch.randn(2, 5, 2, 8)
    pe = rope_tables(torch.randint(0, 9, (5, 3)), (4, 2, 2), 10000.0)
    assert torch.equal(tk.rope_(q, pe), apply_rope(q, pe))


def test_wan_plan_names_slots_every_block_has_and_removal_restores_them():
    from ditserve.accel.token_kernels import KERNELS, apply_eager_kernels, remove_eager_kernels
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT

    cfg = WanConfig.from_dict(dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                   out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                                   cross_attn_norm=True))
    dit = WanDiT(cfg)
    sites = dit.plan.eager_kernels
    assert sites and all(name in KERNELS for _, name in sites)
    before = [[getattr(b.get_submodule(p.rpartition(".")[0]), p.rpartition(".")[2]) for p, _ in sites]
              for b in dit.blocks]
    apply_eager_kernels(dit, sites)
    for block in dit.blocks:
        for path, name in sites:
            owner, _, attr = path.rpartition(".")
            assert getattr(block.get_submodule(owner), attr) is KERNELS[name]
    remove_eager_kernels(dit)
    after = [[getattr(b.get_submodule(p.rpartition(".")[0]), p.rpartition(".")[2]) for p, _ in sites]
             for b in dit.blocks]
    assert after == before


def test_in_place_chunks_are_not_copied_onto_themselves():
    """A chunked in-place site whose op already wrote each chunk over its tokens returns the input,
    with every chunk's result, as the whole call would."""
    x = torch.randn(2, 300, 4)
    expected = x * 2 + 1
    calls = []

    def op(t):
        calls.append(t.data_ptr())
        return t.mul_(2).add_(1)

    out = chunked_call(op, 64, 1, x, _in_place=True)
    assert out is x and len(calls) > 1
    assert torch.equal(out, expected)
