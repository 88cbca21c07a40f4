"""Rotary position embeddings over several position axes (FLUX-style, interleaved pairs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rotary:
    """Rotary tables for a sequence: cos and sin [S, head_dim] (float32), one angle per
    (real, imaginary) pair, repeated for both members of the pair."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> Rotary:
    """cos and sin tables [S, sum(axes_dim)] in float32 for integer positions `ids` [S, n_axes].

    Frequencies are computed in float64 (float32 on MPS, which lacks it), each repeated for the
    (real, imaginary) pair it rotates, as in the reference implementation.
    """
    f64 = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float()
    cos, sin = [], []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim))
        angles = torch.outer(pos[:, i], freqs)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return Rotary(torch.cat(cos, dim=-1), torch.cat(sin, dim=-1))


def apply_rope(x_BSHD: torch.Tensor, rope: Rotary) -> torch.Tensor:
    """Rotate consecutive (real, imag) pairs of the head dim by the position's angle, in float32.

    Eager, as one complex multiply, in place on the float32 copy: three passes over x instead of
    eight separate elementwise kernels (2.4x faster; the same bits), and one float32 temporary, not
    two. Under torch.compile, the real form, which inductor fuses (it generates no code for complex
    operators).
    """
    cos, sin = rope.cos, rope.sin
    if not torch.compiler.is_compiling():
        freqs = torch.complex(cos[:, ::2], sin[:, ::2])[None, :, None, :]
        x = x_BSHD.float().contiguous()
        if x is x_BSHD:  # already float32 and contiguous: the caller's tensor, not a copy to rotate in place
            x = x.clone()
        rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(freqs)
        return torch.view_as_real(rotated).flatten(3).to(x_BSHD.dtype)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    real, imag = x_BSHD.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x_BSHD.float() * cos + rotated.float() * sin).to(x_BSHD.dtype)
