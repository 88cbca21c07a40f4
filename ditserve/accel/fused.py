"""Fused GEMM epilogues for FLUX blocks, applied from outside the model.

* Linear + tanh-GELU as one cuBLASLt call (GELU in the GEMM epilogue), wrapped as a custom op so
  torch.compile keeps it whole instead of splitting it back into a GEMM and a separate GELU kernel.
* Single-stream blocks: the MLP half of `linear1` gets the GELU epilogue and `linear2` is split into
  its attention and MLP halves, accumulated in the second GEMM — no concatenation copy.
The math is the block's own; only where the bytes go changes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.flux.model import SingleStreamBlock, joint_attention, modulate

log = logging.getLogger(__name__)


@torch.library.custom_op("ditserve::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x @ weight.T + bias) for 2-D x."""
    return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)


@linear_gelu.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("ditserve::linear_accumulate", mutates_args=())
def linear_accumulate(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """acc + x @ weight.T for 2-D tensors, with acc read by the GEMM epilogue (beta = 1)."""
    return torch.addmm(acc, x, weight.t())


@linear_accumulate.register_fake
def _(acc, x, weight):
    return acc.new_empty(acc.shape)


class LinearGELU(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_gelu(x.flatten(0, -2), self.weight, self.bias).unflatten(0, x.shape[:-1])


class SplitSingleStreamBlock(nn.Module):
    """SingleStreamBlock with linear1/linear2 split at the attention|MLP boundary."""

    def __init__(self, block: SingleStreamBlock):
        super().__init__()
        d, h = block.dim, block.mlp_hidden
        self.dim, self.heads = d, block.heads
        self.modulation, self.norm, self.attn_op = block.modulation, block.norm, block.attn_op
        w1, b1, w2 = block.linear1.weight, block.linear1.bias, block.linear2.weight
        self.qkv = nn.Linear(d, 3 * d, device="meta")
        self.qkv.weight, self.qkv.bias = nn.Parameter(w1[: 3 * d].contiguous(), False), nn.Parameter(b1[: 3 * d].contiguous(), False)
        self.mlp_in = LinearGELU(block.linear1)
        self.mlp_in.weight = nn.Parameter(w1[3 * d:].contiguous(), False)
        self.mlp_in.bias = nn.Parameter(b1[3 * d:].contiguous(), False)
        self.attn_out = nn.Linear(d, d, device="meta")
        self.attn_out.weight = nn.Parameter(w2[:, :d].contiguous(), False)
        self.attn_out.bias = block.linear2.bias
        self.mlp_out_weight = nn.Parameter(w2[:, d:].contiguous(), False)
        assert h == self.mlp_out_weight.shape[1]

    def forward(self, img, txt, vec, pe):
        shift, scale, gate = self.modulation(vec)
        x = torch.cat([txt, img], dim=1)
        x_mod = modulate(x, shift, scale)
        q, k, v = self.qkv(x_mod).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.norm(q, k)
        attn = joint_attention(self.attn_op, q, k, v, pe)
        hidden = self.mlp_in(x_mod)
        out = linear_accumulate(self.attn_out(attn).flatten(0, 1), hidden.flatten(0, 1), self.mlp_out_weight)
        x = x + gate[:, None] * out.unflatten(0, x.shape[:2])
        return x[:, txt.shape[1]:], x[:, : txt.shape[1]]


def apply_fused_epilogues(dit: nn.Module) -> nn.Module:
    """GELU epilogues in every MLP; split single-stream projections. Call before FP8 or compile."""
    for block in dit.double_blocks:
        for mlp in (block.img_mlp, block.txt_mlp):
            mlp[0], mlp[1] = LinearGELU(mlp[0]), nn.Identity()
    for i, block in enumerate(dit.single_blocks):
        dit.single_blocks[i] = SplitSingleStreamBlock(block)
    log.info("fused GEMM epilogues in %d blocks", len(dit.blocks))
    return dit
