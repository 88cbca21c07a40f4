"""Wan: a video DiT over 3D patches of a causal-VAE latent, with cross-attention to UMT5 text.

Forward = embed -> blocks -> head (models/common/dit.py). Every block maps
(x, context, mod, rope) -> x. Shapes: x [B, L, D] with L = F'·H'·W' patches in (frame, row,
column) order; context [B, T, D] (Wan 2.1 I2V: image tokens first, then 512 text tokens); mod
[B, 6, D] or, with per-token timesteps (TI2V-5B), [B, L, 6, D], in float32; rope a Rotary table
[L, head_dim] split over (frame, row, column).

As the reference implementation does, the norms, the modulation and the gated residual sums run in
float32 whatever the model dtype, and queries and keys are RMS-normalised across all heads (one
norm over the model width) before RoPE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.dit import DiT, Hidden
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.layers import feed_forward, gated_add, norm_affine, norm_modulate
from ditserve.models.common.rope import Rotary, apply_rope, rope_tables
from ditserve.models.wan.config import WanConfig
from ditserve.models.wan.plan import WAN_PLAN

TEXT_TOKENS = 512  # Wan 2.1 I2V: context tokens before the last 512 are image tokens
ROPE_THETA = 10000.0


def modulation(table: torch.Tensor, mod: torch.Tensor) -> list[torch.Tensor]:
    """A learned table [1, n, D] plus the time modulation, [B, n, D] or per token [B, L, n, D]: n
    vectors, each [B, 1, D] or [B, L, D], ready to broadcast over the tokens."""
    if mod.ndim == 4:
        return [m.squeeze(-2) for m in (table[:, None] + mod).chunk(table.shape[1], dim=-2)]
    return list((table + mod).chunk(table.shape[1], dim=-2))


class Attention(nn.Module):
    """Self- or cross-attention with q/k RMS-normalised across heads. With `image_kv` (Wan 2.1 I2V)
    the cross-attention also attends to the image tokens at the front of the context through their own
    key/value projections; the two attention outputs are summed before the output projection."""

    def __init__(self, dim: int, heads: int, eps: float, image_kv: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if image_kv:
            self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        self.attn_op = sdpa_attention
        self.rope_op = apply_rope  # per token: may run over the sequence in chunks (plan.token_sites)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: Rotary | None = None,
                pre=None):
        """`pre`: a transform of `x` applied here rather than by the caller (the block's modulation), so
        that the transformed tokens are freed once projected instead of living through the attention."""
        image = None
        if pre is not None:
            x = pre(x)
        if context is None:
            context = x
        elif self.add_k_proj is not None:
            n_img = context.shape[1] - TEXT_TOKENS  # the reference's split: text is the last 512
            image, context = context[:, :n_img], context[:, n_img:]
        q = self._heads(self.norm_q(self.to_q(x)))
        k = self._heads(self.norm_k(self.to_k(context)))
        v = self._heads(self.to_v(context))
        del x, context
        if rope is not None:  # one at a time: the unrotated query is freed before the key's turn
            q = self.rope_op(q, rope)
            k = self.rope_op(k, rope)
        out = self.attn_op(q, k, v).flatten(2).type_as(q)
        del k, v
        if image is not None:
            k_img = self._heads(self.norm_added_k(self.add_k_proj(image)))
            out = out + self.attn_op(q, k_img, self._heads(self.add_v_proj(image))).flatten(2).type_as(q)
        del q
        return self.to_out(out)


class WanBlock(nn.Module):
    """Modulated self-attention with RoPE, cross-attention to the context, modulated FFN."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.eps = cfg.eps
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps, image_kv=cfg.added_kv_proj_dim is not None)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = feed_forward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, dim))
        # op slots for the float32 per-token pieces (one-pass kernels when eager on CUDA: plan.eager_kernels)
        self.modulate_op, self.norm_op, self.residual_op = norm_modulate, norm_affine, gated_add

    def forward(self, x: torch.Tensor, context: torch.Tensor, mod: torch.Tensor, rope: Rotary,
                *_head_consts) -> torch.Tensor:
        # Only the self-attention mixes tokens; the pieces around it map each token on its own (their
        # tensors in float32 are the largest of a long video: the plan lets them run in chunks)
        shift, scale, gate, c_shift, c_scale, c_gate = modulation(self.scale_shift_table.float(), mod)
        x = self.attn_residual(x, self.attn1(x, rope=rope, pre=lambda t: self.modulate(t, scale, shift)), gate)
        x = self.cross_attention(x, context=context)
        return self.ffn_residual(x, c_scale, c_shift, c_gate)

    def modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.modulate_op(x, scale, shift, self.eps)  # LayerNorm, ·(1 + scale) + shift, in float32

    def attn_residual(self, x: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.residual_op(x, attn, gate)  # x + attn·gate in float32 (the gate is)

    def cross_attention(self, x: torch.Tensor, *, context: torch.Tensor) -> torch.Tensor:
        normed = x if self.norm2 is None else self.norm_op(x, self.norm2.weight, self.norm2.bias, self.eps)
        return x + self.attn2(normed, context)  # ungated, in the model dtype, as the reference

    def ffn_residual(self, x: torch.Tensor, c_scale: torch.Tensor, c_shift: torch.Tensor,
                     c_gate: torch.Tensor) -> torch.Tensor:
        return self.residual_op(x, self.ffn(self.modulate(x, c_scale, c_shift)), c_gate)


class ImageEmbedder(nn.Module):
    """CLIP image tokens -> model width: LayerNorm, MLP (exact GELU), LayerNorm, the norms in float32.
    FLF2V (`pos_len`): the first and last frame's tokens side by side, plus learned positions."""

    def __init__(self, in_dim: int, dim: int, pos_len: int | None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(in_dim), nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_len, in_dim)) if pos_len else None

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # [2B, T, C] (first, last per video) -> [B, 2T, C]
            img = img.reshape(-1, 2 * img.shape[1], img.shape[2]) + self.pos_embed
        h = self.ff(norm_affine(img, self.norm1.weight, self.norm1.bias, self.norm1.eps))
        return norm_affine(h, self.norm2.weight, self.norm2.bias, self.norm2.eps)


class Head(nn.Module):
    """Final LayerNorm modulated by the time embedding (shift, scale) and projection to patches."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.eps = cfg.eps
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, cfg.hidden_size))
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.out_dim * math.prod(cfg.patch_size))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation(self.scale_shift_table, temb.unsqueeze(-2))
        return self.proj_out(norm_modulate(x, scale, shift, self.eps))


@dataclass
class WanInputs:
    """One model call, tensors in the model's dtype except the timesteps.

    `latents` [B, C_in, F, H, W] (I2V: noisy latents, mask and condition concatenated on channels);
    `timesteps` [B] or per token [B, L] (TI2V `expand_timesteps`; L = F'·H'·W'), in training units
    0..1000, any dtype; `context` [B, 512, text_dim] UMT5 states; `image` [B, 257, image_dim] CLIP
    states (Wan 2.1 I2V; FLF2V: [2B, 257, image_dim], first and last frame per video) or None;
    `rope` the rotary table (`WanDiT.positional_tables`), computed once per run, or None.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    image: torch.Tensor | None = None
    rope: Rotary | None = None


class WanDiT(DiT):
    """Wan 2.1 / 2.2 DiT. `forward(WanInputs) -> [B, C_out, F, H, W]` (flow velocity)."""

    plan = WAN_PLAN

    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.hidden_size
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_in = MLPEmbedder(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_in = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.image_in = ImageEmbedder(cfg.image_dim, dim, cfg.pos_embed_seq_len) if cfg.image_dim else None
        self.layers = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head_out = Head(cfg)

    def grid(self, latents_shape) -> tuple[int, int, int]:
        """(frames, rows, columns) of patches for latents [B, C, F, H, W]."""
        pt, ph, pw = self.cfg.patch_size
        return latents_shape[2] // pt, latents_shape[3] // ph, latents_shape[4] // pw

    def positional_tables(self, grid: tuple[int, int, int], device=None) -> Rotary:
        """Rotary table [F'·H'·W', head_dim] for a token grid; a side past `rope_max_seq_len` is
        refused (the reference's precomputed table ends there)."""
        if max(grid) > self.cfg.rope_max_seq_len:
            raise ValueError(f"Wan token grid {grid} exceeds rope_max_seq_len={self.cfg.rope_max_seq_len}")
        f, h, w = grid
        ids = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
        return rope_tables(ids.reshape(-1, 3).to(device), self.cfg.rope_axes, ROPE_THETA)

    def time_embedding(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [B] or [B, L] -> temb [..., D] in `like`'s dtype (the MLP runs in its own
        dtype, float32 when loaded by weights.py) and the six modulation vectors [..., 6, D] in float32."""
        freq = timestep_embedding(t.flatten().float(), self.cfg.freq_dim).unflatten(0, t.shape)
        temb = self.time_in(freq.to(self.time_in.in_layer.weight.dtype)).type_as(like)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1)).float()

    def embed(self, inp: WanInputs) -> Hidden:
        """Patches, the time embedding (per sample or per token) and its six modulation vectors,
        the text (and image) context, the rotary table."""
        grid = self.grid(inp.latents.shape)
        x = self.patch_embedding(inp.latents).flatten(2).transpose(1, 2).contiguous()
        if inp.timesteps.ndim == 2 and inp.timesteps.shape[1] != x.shape[1]:
            raise ValueError(f"per-token timesteps {tuple(inp.timesteps.shape)} do not match {x.shape[1]} tokens")
        temb, mod = self.time_embedding(inp.timesteps, inp.context)
        context = self.text_in(inp.context)
        if inp.image is not None:
            context = torch.cat([self.image_in(inp.image), context], dim=1)
        rope = inp.rope if inp.rope is not None else self.positional_tables(grid, x.device)
        return Hidden((x,), (context, mod, rope, temb, grid))

    def head(self, h: Hidden) -> torch.Tensor:
        """Project each patch back and rearrange patches into latents [B, C_out, F, H, W]."""
        x, (temb, (f, hh, ww)) = h.streams[0], h.consts[3:]
        out = self.head_out(x, temb)
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(x.shape[0], f, hh, ww, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(x.shape[0], -1, f * pt, hh * ph, ww * pw)
