"""FP8 (e4m3) linear layers through torch._scaled_mm: per-output-row weight scales, per-token
activation scales computed on the fly. Applied to the blocks' large projections only."""

from __future__ import annotations

import logging
from fnmatch import fnmatch

import torch
from torch import nn

from ditserve.models.common.plan import DiTPlan

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch ops serve
    triton = None


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric e4m3 quantisation: x ≈ q * scale, scale [rows, 1] in float32.

    x is multiplied by the row's reciprocal scale (one IEEE division per row, not per element):
    the Triton kernel below does the same arithmetic, so both give the same bits."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax * (1.0 / E4M3_MAX)  # what CUDA torch does for `amax / E4M3_MAX`; CPU would divide
    return (x.float() * torch.reciprocal(scale)).to(E4M3), scale


if triton is not None:

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, k, stride, inv_qmax, BLOCK_K: tl.constexpr):
        """One row per program, held in registers: amax, scale, cast."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_K)
        live = offs < k
        x = tl.load(x_ptr + row * stride + offs, mask=live, other=0.0).to(tl.float32)
        # the bits quantize_rows gives: torch.reciprocal is an IEEE division (Triton's `/` is
        # approximate in float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * inv_qmax
        inv_scale = tl.math.div_rn(scale * 0.0 + 1.0, scale)
        tl.store(q_ptr + row * k + offs, (x * inv_scale).to(q_ptr.dtype.element_ty), mask=live)
        tl.store(scale_ptr + row, scale)


@torch.library.custom_op("ditserve::quantize_rows_fp8", mutates_args=())
def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows as one Triton pass (rows of up to 16k elements) for 2-D CUDA tensors."""
    rows, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(rows, k, device=x.device, dtype=E4M3)
    scale = torch.empty(rows, 1, device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(rows,)](x, q, scale, k, x.stride(0), 1.0 / E4M3_MAX, BLOCK_K=block,
                                   num_warps=max(4, min(16, block // 1024)))
    return q, scale


@quantize_rows_fp8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


class FP8Linear(nn.Module):
    """`fast_accum`: cuBLASLt's fp8 fast accumulation (no periodic promotion of the tensor cores' partial
    sums to float32): a faster GEMM with a less exact sum over long K."""

    def __init__(self, linear: nn.Linear, triton_quant: bool = False, fast_accum: bool = False):
        super().__init__()
        self.triton_quant, self.fast_accum = triton_quant, fast_accum
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_q, w_scale = quantize_rows(linear.weight.data)
        self.register_buffer("weight_fp8", w_q)  # [N, K] row-major; .t() is the column-major B
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # [1, N]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        self.out_dtype = linear.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        x_q, x_scale = quantize_rows_fp8(rows) if self.triton_quant else quantize_rows(rows)
        out = torch._scaled_mm(x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        return out.reshape(*shape[:-1], self.out_features)


def fp8_eligible(plan: DiTPlan, name: str, module: nn.Module, min_features: int) -> bool:
    """A block-relative linear the plan lets become FP8, large enough for FP8 to pay."""
    return (isinstance(module, nn.Linear)
            and any(fnmatch(name, p) for p in plan.fp8) and not any(fnmatch(name, p) for p in plan.fp8_keep)
            and min(module.in_features, module.out_features) >= min_features)


def apply_fp8(dit: nn.Module, min_features: int = 256, triton_quant: bool = False,
              fast_accum: bool = False) -> nn.Module:
    """Swap the block linears that the model's plan allows for FP8Linear; `triton_quant` quantises
    activations with the one-pass Triton kernel (CUDA); `fast_accum`: FP8Linear's."""
    swapped = 0
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            if not fp8_eligible(dit.plan, name, module, min_features):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, FP8Linear(module, triton_quant=triton_quant and triton is not None,
                                            fast_accum=fast_accum))
            swapped += 1
    log.info("fp8: %d linear layers swapped", swapped)
    return dit
