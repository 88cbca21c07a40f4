"""MMDiT pieces shared by the dual-stream families (FLUX, Qwen-Image, HunyuanVideo): adaptive
LayerNorm modulation, QK-normed projections, the double- and single-stream blocks and the modulated
output layer.

Blocks let go of each tensor once nothing below needs it (q, k and v once attention has run; the
attention output once both streams have projected it), and the single-stream block works inside its
input projection's output: GELU in place on the MLP part, the attention output written over v, and
that [attention | MLP] slice is the output projection's input (no concatenation). Under a streamed
(offloaded) DiT the activation peak sits in these blocks' MLP halves, and what they hold there is what
the peak is made of. The values are the same either way.

Shapes: img [B, L, D], txt [B, T, D], vec [B, D]. `rope` is the joint (txt, img) `Rotary` table
[T + L, head_dim]; `mask` an optional key mask [B, T + L] (bool, True = attend) when some text
tokens are padding.

Per-token modulation: `vec` may hold K conditioning vectors [B, K, D] and `mod_index` [B, L] (int)
pick, for each image token, the vector its shift, scale and gate come from (Qwen-Image-Edit-2511:
generated-image tokens at timestep t, input-image tokens at timestep 0). The text stream and the
output layer use the first vector, vec[:, 0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.layers import feed_forward, gelu_tanh_
from ditserve.models.common.rope import Rotary, apply_rope

EPS = 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters: modulation supplies scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) scaled and shifted; shift and scale are [B, D] (every token) or [B, L, D] (per token)."""
    return layer_norm(x) * (1 + _tokens(scale)) + _tokens(shift)


def _tokens(m: torch.Tensor) -> torch.Tensor:
    """A modulation chunk as [B, 1 or L, D], ready to broadcast over tokens."""
    return m[:, None] if m.ndim == 2 else m


def main_vec(vec: torch.Tensor) -> torch.Tensor:
    """The conditioning vector [B, D] of the text stream and the output layer (vec[:, 0] when
    `vec` holds several for per-token modulation)."""
    return vec[:, 0] if vec.ndim == 3 else vec


def per_token(chunks: tuple[torch.Tensor, ...], index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Modulation chunks [B, K, D] -> [B, L, D]: token l takes vector index[b, l]. Without an index,
    chunks are [B, D] (or [B, K, D], of which the first vector serves every token)."""
    if index is None:
        return tuple(main_vec(c) for c in chunks)
    at = index.long()[..., None].expand(-1, -1, chunks[0].shape[-1])
    return tuple(torch.gather(c, 1, at) for c in chunks)


class Modulation(nn.Module):
    """vec -> n chunks of (shift, scale, gate), each [B, D]."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, 3 * n * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec)).chunk(3 * self.n, dim=-1)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.q_norm = nn.RMSNorm(head_dim, eps=EPS)
        self.k_norm = nn.RMSNorm(head_dim, eps=EPS)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class SelfAttention(nn.Module):
    """Projections of one stream; QK-norm, RoPE and the joint attention happen in the block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


def mlp(dim: int, ratio: float) -> nn.Sequential:
    return feed_forward(dim, int(dim * ratio))


def norm_rope_qkv(parts, rope: Rotary, heads: int):
    """Queries, keys and values of the joint sequence, ready for attention.

    `parts` holds, in sequence order, one (qkv [B, S_i, 3 * heads * head_dim], QKNorm) per stream;
    queries and keys are RMS-normalised with their stream's weights, the streams concatenated and
    rotated by the joint table `rope`. Returns q, k, v [B, sum S_i, heads, head_dim].
    This is the reference; accel sets a fused kernel with the same contract on each block's `qkv_op`.
    """
    qs, ks, vs = [], [], []
    for qkv, norm in parts:
        q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)
        q, k = norm(q, k)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    q, k, v = (t[0] if len(t) == 1 else torch.cat(t, dim=1) for t in (qs, ks, vs))
    del qs, ks, vs
    q = apply_rope(q, rope)  # one at a time: the normalised q is gone before k's float32 copy is made
    k = apply_rope(k, rope)
    return q, k, v


def attend(op, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention op over the joint sequence; heads flattened back into D.

    The key mask is passed to the op only when present, so ops without mask support still serve
    every unpadded batch.
    """
    out = op(q, k, v) if mask is None else op(q, k, v, mask=mask)
    return out.flatten(2)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over both."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, 2), Modulation(dim, 2)
        self.img_attn, self.txt_attn = SelfAttention(dim, heads), SelfAttention(dim, heads)
        self.img_mlp, self.txt_mlp = mlp(dim, mlp_ratio), mlp(dim, mlp_ratio)
        self.heads = heads
        self.qkv_op = norm_rope_qkv
        self.attn_op = sdpa_attention

    def forward(self, img, txt, vec, rope: Rotary, mask: torch.Tensor | None = None,
                mod_index: torch.Tensor | None = None):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = per_token(self.img_mod(vec), mod_index)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(main_vec(vec))

        q, k, v = self.qkv_op([(self.txt_attn.qkv(modulate(txt, t_shift1, t_scale1)), self.txt_attn.norm),
                               (self.img_attn.qkv(modulate(img, i_shift1, i_scale1)), self.img_attn.norm)],
                              rope, self.heads)
        attn = attend(self.attn_op, q, k, v, mask)
        del q, k, v
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)
        img = img + _tokens(i_gate1) * self.img_attn.proj(img_attn)
        txt = txt + t_gate1[:, None] * self.txt_attn.proj(txt_attn)
        del attn, txt_attn, img_attn
        img = img + _tokens(i_gate2) * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over (txt, img) (FLUX, HunyuanVideo): attention and MLP in parallel from one input
    projection, joined again by one output projection; an optional key mask hides text padding.
    For inference: the forward writes over v after the attention (autograd would still need it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.modulation = Modulation(dim, 1)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.norm = QKNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.qkv_op = norm_rope_qkv
        self.attn_op = sdpa_attention

    def forward(self, img, txt, vec, rope: Rotary, mask: torch.Tensor | None = None):
        shift, scale, gate = self.modulation(vec)
        x = torch.cat([txt, img], dim=1)
        fused = self.linear1(modulate(x, shift, scale))  # [q | k | v | MLP input] per token
        qkv, hidden = fused.split([3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = self.qkv_op([(qkv, self.norm)], rope, self.heads)
        attn = attend(self.attn_op, q, k, v, mask)
        del q, k, v, qkv
        gelu_tanh_(hidden)  # in place: no second MLP-wide tensor
        joined = fused[..., 2 * self.dim:]  # [v | MLP]: the attention output takes v's place, no concatenation
        joined[..., : self.dim].copy_(attn)
        del attn, hidden, fused
        x = x + gate[:, None] * self.linear2(joined)
        return x[:, txt.shape[1]:], x[:, : txt.shape[1]]


class LastLayer(nn.Module):
    """Final adaptive LayerNorm and projection to the packed latent channels.

    The modulation yields (scale, shift) in that order, as in diffusers' checkpoints.
    """

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.adaLN_modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(F.silu(main_vec(vec))).chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))
