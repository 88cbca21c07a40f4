"""The eager per-token kernels (accel/token_kernels.py) on the GPU: each against its reference op at Wan's
widths, and a Wan DiT run eagerly with them against the same DiT without (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rel(got, ref):
    return float((got.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("width,heads", [(1536, 12), (5120, 40), (200, 2)])
def test_kernels_match_reference_ops(width, heads):
    pytest.importorskip("triton")
    from ditserve.accel import token_kernels as tk
    from ditserve.models.common import layers
    from ditserve.models.common.rope import apply_rope, rope_tables

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(2, 1000, width, device=dev, dtype=bf16)[:, 100:900]  # strided rows
    scale, shift, gate = (torch.randn(2, 1, width, device=dev) * 0.3 for _ in range(3))
    w, b = torch.randn(width, device=dev, dtype=bf16), torch.randn(width, device=dev, dtype=bf16)
    assert _rel(tk.norm_modulate(x, scale, shift, 1e-6), layers.norm_modulate(x, scale, shift, 1e-6)) < 3e-3
    assert _rel(tk.norm_affine(x, w, b, 1e-6), layers.norm_affine(x, w, b, 1e-6)) < 3e-3
    y = torch.randn(2, 800, width, device=dev, dtype=bf16)
    ref = layers.gated_add(x, y, gate)
    assert _rel(tk.gated_add(x, y, gate), ref) < 3e-3
    head_dim = width // heads
    q = torch.randn(2, 800, heads, head_dim, device=dev, dtype=bf16)
    third = head_dim // 6 * 2
    pe = rope_tables(torch.randint(0, 30, (800, 3), device=dev), (head_dim - 2 * third, third, third), 10000.0)
    ref = apply_rope(q, pe)
    assert _rel(tk.rope_(q, pe), ref) < 3e-3


def test_wan_eager_with_kernels_matches_without():
    pytest.importorskip("triton")
    from ditserve.accel import accelerate_dit
    from ditserve.accel.token_kernels import remove_eager_kernels
    from ditserve.config import AccelConfig
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT, WanInputs

    torch.manual_seed(0)
    cfg = WanConfig.from_dict(dict(patch_size=[1, 2, 2], num_attention_heads=4, attention_head_dim=64, in_channels=16,
                                   out_channels=16, text_dim=64, freq_dim=64, ffn_dim=512, num_layers=3,
                                   cross_attn_norm=True))
    dit = WanDiT(cfg)
    for p in dit.parameters():
        p.data.normal_(std=0.05)
    dit = dit.cuda().to(torch.bfloat16)
    inp = WanInputs(latents=torch.randn(2, 16, 5, 32, 32, device="cuda", dtype=torch.bfloat16),
                    timesteps=torch.tensor([700.0, 30.0], device="cuda"),
                    context=torch.randn(2, 512, 64, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        ref = dit(inp)
        fast = accelerate_dit(dit, AccelConfig(), torch.device("cuda"))
        assert fast.blocks[0].modulate_op.__module__ == "ditserve.accel.token_kernels"
        got = fast(inp)
        remove_eager_kernels(fast)
        again = dit(inp)
    assert torch.equal(again, ref)
    assert torch.isfinite(got).all() and _rel(got, ref) < 1e-2
