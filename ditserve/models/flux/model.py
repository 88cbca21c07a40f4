"""FLUX.1: a rectified-flow MMDiT with double-stream then single-stream blocks.

Forward = embed -> blocks -> head. Every block maps (img, txt, vec, pe) -> (img, txt), so caching,
offload, sequence sharding and compilation can wrap the list from outside.
Shapes: img [B, L, D], txt [B, T, D], vec [B, D]; pe = (cos, sin), each [T + L, head_dim].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.rope import apply_rope, rope_tables
from ditserve.models.flux.config import FluxConfig

EPS = 1e-6


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters: modulation supplies scale and shift."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


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
    """Projections of one stream; the joint attention itself happens in the block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.norm(q, k)
        return q, k, v


def mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def joint_attention(op, q, k, v, pe) -> torch.Tensor:
    """RoPE on the joint (txt, img) sequence, then attention; heads flattened back into D."""
    cos, sin = pe
    return op(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v).flatten(2)


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over both."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, 2), Modulation(dim, 2)
        self.img_attn, self.txt_attn = SelfAttention(dim, heads), SelfAttention(dim, heads)
        self.img_mlp, self.txt_mlp = mlp(dim, mlp_ratio), mlp(dim, mlp_ratio)
        self.attn_op = sdpa_attention

    def forward(self, img, txt, vec, pe):
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))
        attn = joint_attention(
            self.attn_op,
            torch.cat([txt_q, img_q], dim=1),
            torch.cat([txt_k, img_k], dim=1),
            torch.cat([txt_v, img_v], dim=1),
            pe,
        )
        txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)

        img = img + i_gate1[:, None] * self.img_attn.proj(img_attn)
        img = img + i_gate2[:, None] * self.img_mlp(modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate1[:, None] * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over (txt, img); attention and MLP run in parallel from one input projection."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.modulation = Modulation(dim, 1)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.norm = QKNorm(dim // heads)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.attn_op = sdpa_attention

    def forward(self, img, txt, vec, pe):
        shift, scale, gate = self.modulation(vec)
        x = torch.cat([txt, img], dim=1)
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split([3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).unbind(2)
        q, k = self.norm(q, k)
        attn = joint_attention(self.attn_op, q, k, v, pe)
        x = x + gate[:, None] * self.linear2(torch.cat([attn, F.gelu(mlp_in, approximate="tanh")], dim=-1))
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
        scale, shift = self.adaLN_modulation(F.silu(vec)).chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


@dataclass
class FluxInputs:
    """Per-step inputs; `timesteps` and `guidance` are in [0, 1] (sigma units)."""

    img: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    timesteps: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None = None


class FluxDiT(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embeds else None
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_single_layers)
        )
        self.final_layer = LastLayer(dim, cfg.out_dim)

    def positional_tables(self, img_ids: torch.Tensor, txt_ids: torch.Tensor):
        return rope_tables(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.cfg.theta)

    def embed(self, inp: FluxInputs, pe=None):
        """Patch/text projections, the conditioning vector and the rotary tables."""
        img = self.img_in(inp.img)
        t = inp.timesteps.to(img.dtype) * 1000
        vec = self.time_in(timestep_embedding(t).to(inp.pooled.dtype))
        if self.guidance_in is not None:
            if inp.guidance is None:
                raise ValueError("this FLUX model embeds guidance: pass a guidance value")
            g = inp.guidance.to(img.dtype) * 1000
            vec = vec + self.guidance_in(timestep_embedding(g).to(inp.pooled.dtype))
        vec = vec + self.vector_in(inp.pooled)
        txt = self.txt_in(inp.txt)
        if pe is None:
            pe = self.positional_tables(inp.img_ids, inp.txt_ids)
        return img, txt, vec, pe

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.double_blocks, *self.single_blocks]

    def head(self, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.final_layer(img, vec)

    def forward(self, inp: FluxInputs, pe=None) -> torch.Tensor:
        img, txt, vec, pe = self.embed(inp, pe)
        for block in self.blocks:
            img, txt = block(img, txt, vec, pe)
        return self.head(img, vec)
