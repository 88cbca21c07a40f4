"""Eager Triton kernels for the per-token float32 pieces of a block (Wan's): the modulated LayerNorm, the
affine LayerNorm, the gated residual sum and the rotary embedding.

Run eagerly, each of these is several PyTorch kernels over float32 copies of the hidden states: the
modulated norm reads and writes [L, D] six times (to float32, normalise, scale, shift, back), the gated
residual three, the rotary embedding three per slice. Each kernel here reads its inputs once and writes
its output once, with the math in float32 in registers and one rounding at the store — the same ops in
the same order as the reference, so results agree to float32 rounding (a bf16 output differs from the
reference's by at most one unit in the last place, and rarely).

Under torch.compile inductor fuses the same ops itself, so these are set only on a DiT that runs eager
on CUDA (`accelerate_dit`, with `AccelConfig.fused_kernels`), on the op slots its plan names
(`DiTPlan.eager_kernels`). CPU tensors, and shapes a kernel does not take, go to the reference op.
tests/unit/test_token_kernels.py runs the kernels in Triton's interpreter; tests/gpu on the device.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ditserve.models.common import layers
from ditserve.models.common.rope import Rotary, apply_rope

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference ops serve
    triton = None

if triton is not None:

    @triton.jit
    def _norm_rows(x, out, w, b, rows_per_batch, xs_b, xs_t, ws_b, ws_t, bs_b, bs_t, width, eps,
                   ONE_PLUS: tl.constexpr, BLOCK: tl.constexpr):
        """One row (token) of [B, L, D] per program: LayerNorm over D in float32, then ·w + b, or
        ·(1 + w) + b with ONE_PLUS (a modulation's scale and shift); w and b [B, L, D] by strides (0
        where broadcast). The output is contiguous."""
        r = tl.program_id(0).to(tl.int64)
        bi, t = r // rows_per_batch, r % rows_per_batch
        d = tl.arange(0, BLOCK)
        live = d < width
        v = tl.load(x + bi * xs_b + t * xs_t + d, mask=live, other=0.0).to(tl.float32)
        mean = tl.sum(v, axis=0) / width
        centred = tl.where(live, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
        scale = tl.load(w + bi * ws_b + t * ws_t + d, mask=live, other=0.0).to(tl.float32)
        if ONE_PLUS:
            scale = 1.0 + scale
        shift = tl.load(b + bi * bs_b + t * bs_t + d, mask=live, other=0.0).to(tl.float32)
        y = centred * rstd * scale + shift
        tl.store(out + r * width + d, y.to(out.dtype.element_ty), mask=live)

    @triton.jit
    def _gated_add_rows(x, y, g, rows_per_batch, xs_b, xs_t, ys_b, ys_t, gs_b, gs_t, width,
                        BLOCK: tl.constexpr):
        """x + y·g per row in float32, written over y."""
        r = tl.program_id(0).to(tl.int64)
        bi, t = r // rows_per_batch, r % rows_per_batch
        d = tl.arange(0, BLOCK)
        live = d < width
        xv = tl.load(x + bi * xs_b + t * xs_t + d, mask=live, other=0.0).to(tl.float32)
        dst = y + bi * ys_b + t * ys_t + d
        yv = tl.load(dst, mask=live, other=0.0).to(tl.float32)
        gv = tl.load(g + bi * gs_b + t * gs_t + d, mask=live, other=0.0).to(tl.float32)
        tl.store(dst, (yv * gv + xv).to(y.dtype.element_ty), mask=live)

    @triton.jit
    def _rope_rows(x, cos, sin, rows_per_batch, xs_b, xs_t, width, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        """One token's H·Dh row of [B, S, H, Dh] rotated in place: each (real, imaginary) pair of a head by
        the token's angle; the pair partner of element e is e ^ 1 (Dh is even)."""
        r = tl.program_id(0).to(tl.int64)
        bi, t = r // rows_per_batch, r % rows_per_batch
        e = tl.arange(0, BLOCK)
        live = e < width
        row = x + bi * xs_b + t * xs_t
        v = tl.load(row + e, mask=live, other=0.0).to(tl.float32)
        pair = tl.load(row + (e ^ 1), mask=live, other=0.0).to(tl.float32)
        table = t * HEAD_DIM + e % HEAD_DIM
        c = tl.load(cos + table, mask=live, other=0.0)
        s = tl.load(sin + table, mask=live, other=0.0) * tl.where((e & 1) == 0, -1.0, 1.0)
        tl.store(row + e, (v * c + pair * s).to(x.dtype.element_ty), mask=live)


def _block(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows `width` wide: the whole row in one program."""
    block = triton.next_power_of_2(width)
    return block, min(16, max(1, block // 256))


def _rows3(t: torch.Tensor, like: torch.Tensor) -> tuple[int, int] | None:
    """(batch stride, token stride) of `t` broadcast to `like`'s [B, L, D], or None when its last dim
    is not unit-stride."""
    try:
        t = t.expand_as(like)
    except RuntimeError:  # not broadcastable
        return None
    return (t.stride(0), t.stride(1)) if t.stride(2) == 1 else None


def norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
              one_plus: bool) -> torch.Tensor:
    """The kernel behind `norm_modulate` (one_plus: weight is a modulation's scale) and `norm_affine`,
    for x [B, L, D] with unit-stride rows; weight and bias broadcast to it."""
    batch, length, width = x.shape
    out = torch.empty(batch, length, width, device=x.device, dtype=x.dtype)
    (xb, xt), (wb, wt), (bb, bt) = _rows3(x, x), _rows3(weight, x), _rows3(bias, x)
    block, warps = _block(width)
    _norm_rows[(batch * length,)](x, out, weight, bias, length, xb, xt, wb, wt, bb, bt, width, eps,
                                  ONE_PLUS=one_plus, BLOCK=block, num_warps=warps)
    return out


def gated_add_rows(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """The kernel behind `gated_add`: x + y·gate in float32, written over y (returned)."""
    batch, length, width = x.shape
    (xb, xt), (yb, yt), (gb, gt) = _rows3(x, x), _rows3(y, x), _rows3(gate, x)
    block, warps = _block(width)
    _gated_add_rows[(batch * length,)](x, y, gate, length, xb, xt, yb, yt, gb, gt, width,
                                       BLOCK=block, num_warps=warps)
    return y


def rope_rows(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The kernel behind `rope_`: x [B, S, H, Dh] (each token's H·Dh contiguous) rotated in place."""
    batch, length, heads, head_dim = x.shape
    block, warps = _block(heads * head_dim)
    _rope_rows[(batch * length,)](x, cos.float().contiguous(), sin.float().contiguous(), length,
                                  x.stride(0), x.stride(1), heads * head_dim, HEAD_DIM=head_dim,
                                  BLOCK=block, num_warps=warps)
    return x


def _takes(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """A CUDA tensor of [B, L, D] with unit-stride rows, outside torch.compile, every other operand on
    its device and broadcastable with unit-stride rows."""
    return (x.is_cuda and x.ndim == 3 and x.stride(2) == 1 and not torch.compiler.is_compiling()
            and all(o.device == x.device and o.ndim <= 3 and _rows3(o, x) is not None for o in others))


def norm_modulate(x, scale, shift, eps):
    """`layers.norm_modulate` in one kernel on CUDA."""
    if _takes(x, scale, shift):
        return norm_rows(x, scale, shift, eps, one_plus=True)
    return layers.norm_modulate(x, scale, shift, eps)


def norm_affine(x, weight, bias, eps):
    """`layers.norm_affine` in one kernel on CUDA."""
    if _takes(x, weight, bias):
        return norm_rows(x, weight, bias, eps, one_plus=False)
    return layers.norm_affine(x, weight, bias, eps)


def gated_add(x, y, gate):
    """`layers.gated_add` in one kernel on CUDA, written over `y` (a fresh attention or feed-forward
    output, which the caller drops)."""
    if y.shape == x.shape and y.dtype == x.dtype and _takes(x, y, gate):
        return gated_add_rows(x, y, gate)
    return layers.gated_add(x, y, gate)


def rope_(x: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """`apply_rope` in one kernel on CUDA, in place (for a slot whose unrotated input is dropped)."""
    ok = (x.is_cuda and x.ndim == 4 and x.shape[-1] % 2 == 0 and x.stride(3) == 1 and x.stride(2) == x.shape[3]
          and rope.cos.shape == (x.shape[1], x.shape[3]) and not torch.compiler.is_compiling())
    return rope_rows(x, rope.cos, rope.sin) if ok else apply_rope(x, rope)


KERNELS = {"norm_modulate": norm_modulate, "norm_affine": norm_affine, "gated_add": gated_add, "rope_": rope_}
_SAVED = "_ditserve_eager_saved"


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def apply_eager_kernels(dit: nn.Module, sites: tuple[tuple[str, str], ...]) -> nn.Module:
    """Set each (block-relative slot path, kernel name) of `sites` on every block that has the slot; the
    slots' previous ops are kept for `remove_eager_kernels`."""
    count = 0
    for block in dit.blocks:
        for path, name in sites:
            owner_path, _, attr = path.rpartition(".")
            owner = block.get_submodule(owner_path) if owner_path else block
            if getattr(owner, attr, None) is None:
                continue
            owner.__dict__.setdefault(_SAVED, {}).setdefault(attr, getattr(owner, attr))
            setattr(owner, attr, KERNELS[name])
            count += 1
    log.info("eager Triton kernels on %d op slots", count)
    return dit


def remove_eager_kernels(dit: nn.Module) -> nn.Module:
    """Put back the ops `apply_eager_kernels` replaced (before compiling, say)."""
    for module in dit.modules():
        for attr, op in module.__dict__.pop(_SAVED, {}).items():
            setattr(module, attr, op)
    return dit
