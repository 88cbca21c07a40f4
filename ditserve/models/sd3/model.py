"""Stable Diffusion 3 / 3.5: a rectified-flow MMDiT (Esser et al. 2024, "Scaling Rectified Flow
Transformers"), and SD3.5-Medium's MMDiT-X.

Forward = embed -> blocks -> head (models/common/dit.py). Latents are patchified by a strided
convolution and get learned absolute positions, cropped from the centre of a
`pos_embed_max_size`² table to the image's patch grid (no rotary embedding). The conditioning vector
`vec` is the timestep embedding plus the pooled CLIP-L/CLIP-G projection. Every joint block keeps
separate weights for image and text tokens and runs one attention over both (image first); the last
block only lets the text be read (context-pre-only: no text output). MMDiT-X blocks add a second,
image-only self-attention from the same normalised input; SD3.5 normalises queries and keys per head
(RMSNorm). Shapes: x [B, C, H, W] latents, img [B, L, D], txt [B, T, D], vec [B, D]; `grid`, the
(rows, cols) of patches, rides along with vec so the head can unpatchify.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.dit import DiT, Hidden, run_block
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.mmdit import LastLayer, Modulation, QKNorm, attend, layer_norm, mlp, modulate
from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.plan import SD3_PLAN


class Attention(nn.Module):
    """One stream's fused q/k/v projection, optional per-head QK RMSNorm, optional output projection."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, proj: bool = True):
        super().__init__()
        self.head_dim = dim // heads  # the heads follow from the projection's width (a TP shard has fewer)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(self.head_dim) if qk_norm else None
        self.proj = nn.Linear(dim, dim) if proj else None

    def heads_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [B, S, heads, head_dim], queries and keys normalised where configured."""
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).unbind(2)
        if self.norm is not None:
            q, k = self.norm(q, k)
        return q, k, v


class JointBlock(nn.Module):
    """MMDiT block: adaLN-Zero modulation per stream, joint attention over (img, txt), MLPs.

    `pre_only` (the last block): the text stream is only attended to, never updated; its modulation is
    a plain (scale, shift). `dual` (MMDiT-X): a second image-only attention with its own modulation.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False, dual: bool = False):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.img_mod = Modulation(dim, 3 if dual else 2)
        self.txt_mod = nn.Linear(dim, 2 * dim) if pre_only else Modulation(dim, 2)
        self.img_attn = Attention(dim, heads, qk_norm)
        self.txt_attn = Attention(dim, heads, qk_norm, proj=not pre_only)
        self.attn2 = Attention(dim, heads, qk_norm) if dual else None
        self.img_mlp = mlp(dim, 4.0)
        self.txt_mlp = None if pre_only else mlp(dim, 4.0)
        self.attn_op = sdpa_attention
        self.attn2_op = sdpa_attention  # every block has the site, so backends can set it everywhere

    def forward(self, img, txt, vec, grid: tuple[int, int] | None = None):
        mods = self.img_mod(vec)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:6]
        img_normed = layer_norm(img)
        if self.pre_only:
            t_scale1, t_shift1 = self.txt_mod(F.silu(vec)).chunk(2, dim=-1)
        else:
            t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        qi, ki, vi = self.img_attn.heads_qkv(img_normed * (1 + scale1[:, None]) + shift1[:, None])
        qt, kt, vt = self.txt_attn.heads_qkv(modulate(txt, t_shift1, t_scale1))
        attn = attend(self.attn_op, torch.cat([qi, qt], 1), torch.cat([ki, kt], 1), torch.cat([vi, vt], 1))
        del qi, ki, vi, qt, kt, vt  # each tensor goes once nothing below reads it: the MLPs are the peak
        img_attn, txt_attn = attn.split([img.shape[1], txt.shape[1]], dim=1)
        img = img + gate1[:, None] * self.img_attn.proj(img_attn)
        if not self.pre_only:
            txt = txt + t_gate1[:, None] * self.txt_attn.proj(txt_attn)
        del attn, img_attn, txt_attn

        if self.dual:
            shift3, scale3, gate3 = mods[6:]
            q, k, v = self.attn2.heads_qkv(img_normed * (1 + scale3[:, None]) + shift3[:, None])
            img = img + gate3[:, None] * self.attn2.proj(attend(self.attn2_op, q, k, v))
            del q, k, v
        del img_normed

        img = img + gate2[:, None] * self.img_mlp(modulate(img, shift2, scale2))
        if self.pre_only:
            return img, txt  # the text is spent; returned unchanged so every block maps (img, txt)
        txt = txt + t_gate2[:, None] * self.txt_mlp(modulate(txt, t_shift2, t_scale2))
        return img, txt


@dataclass
class SD3Inputs:
    """Per-step inputs: latents x [B, C, H, W]; text tokens txt [B, T, joint_attention_dim] (CLIP
    penultimate states then T5); pooled [B, pooled_projection_dim]; timesteps [B] in training units."""

    x: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    timesteps: torch.Tensor


class SD3DiT(DiT):
    plan = SD3_PLAN

    def __init__(self, cfg: SD3Config):
        super().__init__()
        self.cfg = cfg
        dim, heads, p = cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p)
        self.pos_table = nn.Parameter(torch.empty(1, cfg.pos_embed_max_size**2, dim))
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        last, qk = cfg.num_layers - 1, cfg.qk_norm is not None
        self.joint_blocks = nn.ModuleList(
            JointBlock(dim, heads, qk, pre_only=i == last, dual=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)
        )
        self.final_layer = LastLayer(dim, cfg.out_dim)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Learned positions [1, h*w, D] of an h x w patch grid: the centre crop of the table."""
        size = self.cfg.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"a {h}x{w} patch grid exceeds the {size}x{size} position table")
        top, left = (size - h) // 2, (size - w) // 2
        table = self.pos_table.view(1, size, size, -1)[:, top: top + h, left: left + w]
        return table.reshape(1, h * w, -1)

    def embed(self, inp: SD3Inputs) -> Hidden:
        """Patches + positions, the conditioning vector, projected text."""
        img = self.x_embedder(inp.x)
        h, w = img.shape[-2:]
        img = (img.flatten(2).transpose(1, 2) + self.positions(h, w)).to(img.dtype).contiguous()
        vec = self.time_in(timestep_embedding(inp.timesteps).to(inp.pooled.dtype)) + self.vector_in(inp.pooled)
        return Hidden((img, self.txt_in(inp.txt)), (vec, (h, w)))

    def head(self, h: Hidden) -> torch.Tensor:
        """Final adaLN and projection, unpatchified back to latents [B, C, H, W]."""
        (img, _), (vec, grid) = h.streams, h.consts
        out = self.final_layer(img, vec)
        p = self.cfg.patch_size
        out = out.view(out.shape[0], *grid, p, p, -1)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(out.shape[0], -1, grid[0] * p, grid[1] * p)

    def forward_skipping(self, inp: SD3Inputs, skip_layers: Collection[int]) -> torch.Tensor:
        """The plain forward without the blocks `skip_layers` (skip-layer guidance). Wrappers that
        run segments (graphs, step caches) pass this through to the model, so it runs eagerly."""
        h = self.embed(inp)
        for i, block in enumerate(self.blocks):
            if i not in skip_layers:
                h = run_block(block, h)
        return self.head(h)
