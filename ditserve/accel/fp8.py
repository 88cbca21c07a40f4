"""FP8 (e4m3) linear layers through torch._scaled_mm: per-output-row weight scales, per-token
activation scales computed on the fly. Applied to the blocks' large projections only."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric e4m3 quantisation: x ≈ q * scale, scale [rows, 1] in float32."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).to(E4M3), scale


class FP8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_q, w_scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_fp8", w_q)  # [N, K] row-major; .t() is the column-major B
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # [1, N]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        out = torch._scaled_mm(x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype)
        return out.reshape(*shape[:-1], self.out_features)


def apply_fp8(dit: nn.Module, min_features: int = 256) -> nn.Module:
    """Swap every large nn.Linear inside the blocks for FP8Linear (modulation layers stay: M=1)."""
    swapped = 0
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear) or name.endswith(("mod.lin", "modulation.lin")):
                continue
            if min(module.in_features, module.out_features) < min_features:
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, FP8Linear(module))
            swapped += 1
    log.info("fp8: %d linear layers swapped", swapped)
    return dit
