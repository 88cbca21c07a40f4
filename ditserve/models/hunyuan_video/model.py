"""HunyuanVideo: a video MMDiT with a text token refiner, dual-stream then single-stream blocks.

Forward = embed -> blocks -> head (models/common/dit.py). The latents arrive packed: [B, L, C·pt·p·p],
one row per (pt, p, p) patch of the [B, C, F, H, W] video latents in (frame, row, column) order
(`pack`/`unpack`); the prediction leaves in the same layout, so the solver steps packed latents.
The LLaMA text states pass through the token refiner (self-attention over the prompt, conditioned on
the timestep and the masked mean of the prompt), then every block maps
(img, txt, vec, rope, mask) -> (img, txt): img [B, L, D], txt [B, T, D], vec [B, D]; rope a Rotary
table over the joint (txt, img) sequence whose text rows do not rotate; mask a key mask [B, T + L]
that hides the text padding (None when there is none).
The dual- and single-stream blocks and the modulation layers are models/common/mmdit.py's (as FLUX).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.dit import DiT, Hidden
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.mmdit import DoubleStreamBlock, LastLayer, SingleStreamBlock, attend
from ditserve.models.common.rope import Rotary
from ditserve.models.hunyuan_video.config import HunyuanVideoConfig
from ditserve.models.hunyuan_video.plan import HUNYUAN_VIDEO_PLAN

EPS = 1e-6


def pack(x_BCFHW: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Video latents [B, C, F, H, W] -> patch rows [B, F'·H'·W', C·pt·p·p] (the patch embedding's order)."""
    b, c, f, h, w = x_BCFHW.shape
    pt, ph, pw = patch
    x = x_BCFHW.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (f // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def unpack(x_BLP: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Patch rows [B, L, C·pt·p·p] on the token grid (f, h, w) -> [B, C, f·pt, h·p, w·p]."""
    f, h, w = grid
    pt, ph, pw = patch
    x = x_BLP.reshape(x_BLP.shape[0], f, h, w, -1, pt, ph, pw)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x_BLP.shape[0], -1, f * pt, h * ph, w * pw)


def video_rope(grid: tuple[int, int, int], text_len: int, axes_dim: tuple[int, ...], theta: float,
               device) -> Rotary:
    """Rotary tables over (text, video tokens): text rows angle 0 (not rotated); video tokens by
    (frame, row, column) position, frequencies in float32 as diffusers computes them."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    angles = []
    for i, dim in enumerate(axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
        angles.append(torch.outer(pos[:, i], freqs))
    angles = torch.cat(angles, dim=-1).repeat_interleave(2, dim=1)
    angles = torch.cat([angles.new_zeros(text_len, angles.shape[1]), angles])
    return Rotary(angles.cos(), angles.sin())


def joint_mask(txt_mask: torch.Tensor | None, img_len: int) -> torch.Tensor | None:
    """The key mask [B, T + L] over (txt, img), or None when no text mask is given."""
    if txt_mask is None:
        return None
    ones = torch.ones(txt_mask.shape[0], img_len, dtype=torch.bool, device=txt_mask.device)
    return torch.cat([txt_mask.bool(), ones], dim=1)


class PatchEmbed(nn.Module):
    """diffusers' Conv3d patch embedding (weight [D, C, pt, p, p]) as one matmul over packed patches."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, in_channels, *patch))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x_BLP: torch.Tensor) -> torch.Tensor:
        return F.linear(x_BLP, self.weight.flatten(1), self.bias)


class RefinerBlock(nn.Module):
    """Self-attention + SiLU MLP over the prompt tokens, the residuals gated by the conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.gates = nn.Linear(dim, 2 * dim)
        self.attn_op = sdpa_attention

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)
        gate_attn, gate_mlp = self.gates(F.silu(c)).chunk(2, dim=-1)
        x = x + self.proj(attend(self.attn_op, q, k, v, mask)) * gate_attn[:, None]
        return x + self.mlp(self.norm2(x)) * gate_mlp[:, None]


class TokenRefiner(nn.Module):
    """LLaMA states [B, T, Dt] -> refined text tokens [B, T, D]."""

    def __init__(self, in_dim: int, dim: int, heads: int, layers: int, mlp_ratio: float):
        super().__init__()
        self.time_in = MLPEmbedder(256, dim)
        self.pooled_in = MLPEmbedder(in_dim, dim)
        self.proj_in = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(RefinerBlock(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, txt: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # in float32, as the masked mean (the pipeline drops padding and passes no mask)
            pooled = txt.float().mean(dim=1).to(txt.dtype)
        else:
            weights = mask.float()[..., None]
            pooled = ((txt * weights).sum(dim=1) / weights.sum(dim=1)).to(txt.dtype)
        c = self.time_in(timestep_embedding(t).to(pooled.dtype)) + self.pooled_in(pooled)
        # real tokens attend to real tokens, as in diffusers (key 0 always open, so no row is empty);
        # diffusers lets padded queries see token 0 only, here they see the real tokens: their outputs
        # never reach the video tokens (the blocks mask them as keys)
        key_mask = None
        if mask is not None:
            key_mask = mask.bool().clone()
            key_mask[:, 0] = True
        x = self.proj_in(txt)
        for block in self.blocks:
            x = block(x, c, key_mask)
        return x


@dataclass
class HunyuanVideoInputs:
    """Per-step inputs. `img` packed latents [B, L, C·pt·p·p] on the token `grid` (f, h, w);
    `timesteps` [B] in training units (0..1000); `txt` LLaMA states [B, T, Dt] with `txt_mask` [B, T]
    (True/1 = token); `pooled` CLIP [B, P]; `guidance` [B] the embedded guidance as diffusers' transformer
    takes it (scale x 1000). `rope` may be computed once per run (`positional_tables`)."""

    img: torch.Tensor
    grid: tuple[int, int, int]
    timesteps: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    txt_mask: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    rope: Rotary | None = None


class HunyuanVideoDiT(DiT):
    plan = HUNYUAN_VIDEO_PLAN

    def __init__(self, cfg: HunyuanVideoConfig):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.img_in = PatchEmbed(cfg.in_channels, dim, cfg.patch)
        self.txt_in = TokenRefiner(cfg.text_embed_dim, dim, heads, cfg.num_refiner_layers, cfg.mlp_ratio)
        self.time_in = MLPEmbedder(256, dim)
        self.guidance_in = MLPEmbedder(256, dim) if cfg.guidance_embeds else None
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_single_layers))
        self.final_layer = LastLayer(dim, cfg.out_dim * cfg.patch_size_t * cfg.patch_size ** 2)

    def grid(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The token grid (f, h, w) of video latents [B, C, F, H, W]."""
        return tuple(n // p for n, p in zip(latent_shape[2:], self.cfg.patch))

    def positional_tables(self, grid: tuple[int, int, int], text_len: int, device) -> Rotary:
        return video_rope(grid, text_len, self.cfg.rope_axes_dim, self.cfg.rope_theta, device)

    def embed(self, inp: HunyuanVideoInputs) -> Hidden:
        """Patch embedding, the refined text, the conditioning vector, rotary tables and key mask."""
        img = self.img_in(inp.img)
        vec = self.time_in(timestep_embedding(inp.timesteps).to(inp.pooled.dtype))
        if self.guidance_in is not None:
            if inp.guidance is None:
                raise ValueError("this HunyuanVideo model embeds guidance: pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(inp.guidance).to(inp.pooled.dtype))
        vec = vec + self.vector_in(inp.pooled)
        txt = self.txt_in(inp.txt, inp.timesteps, inp.txt_mask)
        rope = inp.rope
        if rope is None:
            rope = self.positional_tables(inp.grid, txt.shape[1], img.device)
        return Hidden((img, txt), (vec, rope, joint_mask(inp.txt_mask, img.shape[1])))

    def head(self, h: Hidden) -> torch.Tensor:
        (img, _), (vec, *_) = h.streams, h.consts
        return self.final_layer(img, vec)
