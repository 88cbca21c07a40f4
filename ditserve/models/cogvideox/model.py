"""CogVideoX: an expert-adaptive-LayerNorm video DiT over one joint sequence of text and video tokens.

Forward = embed -> blocks -> head (models/common/dit.py). Every block maps (x, txt, temb, rope) ->
(x, txt). Shapes: latents [B, F, C, H, W] (frames before channels, as diffusers'); x [B, L, D] with
L = F'·H'·W' patches in (frame, row, column) order; txt [B, T, D] (T5 states projected, T = 226);
temb [B, E]; rope a Rotary table over the joint sequence (identity rows for the text) or None (2B).

Text and video share every weight of a block except their LayerNorm modulation ("expert" adaptive
LayerNorm: one linear makes shift/scale/gate for each modality), attend jointly with per-head QK
LayerNorm, and go through one feed-forward. Positions: 2B adds a 3D sin-cos table after the patch
embedding; 5B rotates the video queries and keys (3D RoPE on a grid cropped to the trained aspect);
1.5 patches two latent frames deep and slices its rotary grid from the trained sample size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.plan import COGVIDEOX_PLAN
from ditserve.models.common.attention import sdpa_attention
from ditserve.models.common.dit import DiT, Hidden
from ditserve.models.common.embeddings import MLPEmbedder
from ditserve.models.common.layers import feed_forward
from ditserve.models.common.rope import Rotary, apply_rope

ROPE_THETA = 10000.0
QK_NORM_EPS = 1e-6


def time_embedding(t: torch.Tensor, dim: int, shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of timesteps [N], cosines first (diffusers' `Timesteps` with
    flip_sin_to_cos and `downscale_freq_shift=shift`), in float32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / (half - shift))[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# -- positions ------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M, dim] = (sin | cos) of float32 positions against float64 frequencies."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_table(cfg: CogVideoXConfig, grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """2B's 3D sin-cos positions [F'·H'·W', D] in float32 for a token grid: a quarter of the width
    for the frame, the rest for the (column, row) plane, positions divided by the interpolation scales."""
    f, h, w = grid
    dim = cfg.hidden_size
    rows = torch.arange(h, device=device, dtype=torch.float32) / cfg.spatial_interpolation_scale
    cols = torch.arange(w, device=device, dtype=torch.float32) / cfg.spatial_interpolation_scale
    col_pos, row_pos = (g.reshape(-1) for g in torch.meshgrid(rows, cols, indexing="ij")[::-1])
    spatial = torch.cat([_sincos_1d(3 * dim // 8, col_pos), _sincos_1d(3 * dim // 8, row_pos)], dim=1)
    frames = torch.arange(f, device=device, dtype=torch.float32) / cfg.temporal_interpolation_scale
    temporal = _sincos_1d(dim // 4, frames)
    table = torch.cat([temporal[:, None].expand(-1, h * w, -1), spatial[None].expand(f, -1, -1)], dim=-1)
    return table.reshape(f * h * w, dim).float()


def _rope_axis(dim: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [M, dim] for float32 positions, frequencies in float32, each repeated for its pair."""
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim))
    angles = torch.outer(pos, freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def crop_region(grid_hw: tuple[int, int], base_w: int, base_h: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (top, left), (bottom, right) of the token grid resized into the trained grid, centred."""
    h, w = grid_hw
    if h / w > base_h / base_w:
        rh, rw = base_h, round(base_h / h * w)
    else:
        rw, rh = base_w, round(base_w / w * h)
    top, left = round((base_h - rh) / 2.0), round((base_w - rw) / 2.0)
    return (top, left), (top + rh, left + rw)


def rope_table(cfg: CogVideoXConfig, grid: tuple[int, int, int], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F'·H'·W', head_dim] for the video tokens.

    5B: rows and columns spread over the crop of the trained grid (sample size / patch) that the
    video's aspect fills; frames over [0, F'(F'-1)/F']. 1.5: integer positions, which must fit in the
    trained grid (diffusers slices its table there and fails past it)."""
    f, h, w = grid
    base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
    f32 = dict(device=device, dtype=torch.float32)
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = crop_region((h, w), base_w, base_h)
        rows = torch.linspace(top, bottom * (h - 1) / h, h, **f32)
        cols = torch.linspace(left, right * (w - 1) / w, w, **f32)
        frames = torch.linspace(0, f * (f - 1) / f, f, **f32)
    else:
        if h > base_h or w > base_w:
            raise ValueError(f"CogVideoX token grid {h}x{w} exceeds the trained {base_h}x{base_w} "
                             "(sample_height, sample_width / patch_size)")
        rows, cols, frames = (torch.arange(n, **f32) for n in (h, w, f))
    dt, dh, dw = cfg.rope_axes
    parts = [_rope_axis(dt, frames), _rope_axis(dh, rows), _rope_axis(dw, cols)]

    def combine(k: int) -> torch.Tensor:
        t_, h_, w_ = (p[k] for p in parts)
        return torch.cat([t_[:, None, None].expand(-1, h, w, -1), h_[None, :, None].expand(f, -1, w, -1),
                          w_[None, None].expand(f, h, -1, -1)], dim=-1).reshape(f * h * w, -1)

    return combine(0), combine(1)


def joint_rope(cos: torch.Tensor, sin: torch.Tensor, text_len: int) -> Rotary:
    """The video table behind `text_len` identity rows (cos 1, sin 0): one table over the joint
    sequence, so the text tokens pass through unrotated (exactly: x·1 - y·0)."""
    ones, zeros = cos.new_ones(text_len, cos.shape[1]), cos.new_zeros(text_len, cos.shape[1])
    return Rotary(torch.cat([ones, cos]), torch.cat([zeros, sin]))


# -- blocks ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Joint self-attention over [text, video] with per-head LayerNorm on q and k and RoPE."""

    def __init__(self, dim: int, heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.to_out = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.norm_q, self.norm_k = nn.LayerNorm(head_dim, eps=QK_NORM_EPS), nn.LayerNorm(head_dim, eps=QK_NORM_EPS)
        self.attn_op = sdpa_attention

    def forward(self, x: torch.Tensor, rope: Rotary | None) -> torch.Tensor:
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)))
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)))
        v = self.to_v(x).unflatten(-1, (self.heads, -1))
        if rope is not None:  # one at a time: the unrotated query is gone before the key's float32 copy
            q = apply_rope(q, rope)
            k = apply_rope(k, rope)
        return self.to_out(self.attn_op(q, k, v).flatten(2).type_as(x))


class ExpertNorm(nn.Module):
    """LayerNorm modulated per modality: one linear of the time embedding gives (shift, scale, gate)
    for the video and for the text tokens; the norm itself is shared."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 6 * cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)

    def forward(self, x: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor):
        shift, scale, gate, t_shift, t_scale, t_gate = self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)
        return (self.norm(x) * (1 + scale) + shift, self.norm(txt) * (1 + t_scale) + t_shift, gate, t_gate)


class CogVideoXBlock(nn.Module):
    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1, self.norm2 = ExpertNorm(cfg), ExpertNorm(cfg)
        self.attn = Attention(dim, cfg.num_attention_heads, cfg.attention_bias)
        self.ff = feed_forward(dim, 4 * dim)

    def forward(self, x: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor, rope: Rotary | None,
                *_head_consts) -> tuple[torch.Tensor, torch.Tensor]:
        n = txt.shape[1]
        x_n, txt_n, gate, t_gate = self.norm1(x, txt, temb)
        joint = torch.cat([txt_n, x_n], dim=1)
        del x_n, txt_n  # each tensor goes once nothing below reads it: the feed-forward is the block's peak
        attn = self.attn(joint, rope)
        del joint
        x, txt = x + gate * attn[:, n:], txt + t_gate * attn[:, :n]
        del attn
        x_n, txt_n, gate, t_gate = self.norm2(x, txt, temb)
        joint = torch.cat([txt_n, x_n], dim=1)
        del x_n, txt_n
        ff = self.ff(joint)
        return x + gate * ff[:, n:], txt + t_gate * ff[:, :n]


class Head(nn.Module):
    """Final LayerNorm, then a LayerNorm modulated by the time embedding (shift, scale), then the
    projection to patches."""

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        dim, affine = cfg.hidden_size, cfg.norm_elementwise_affine
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=affine)
        self.mod = nn.Linear(cfg.time_embed_dim, 2 * dim)
        self.norm_out = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=affine)
        self.proj_out = nn.Linear(dim, cfg.out_dim * cfg.patch_size**2 * (cfg.patch_size_t or 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(F.silu(temb))[:, None].chunk(2, dim=-1)
        return self.proj_out(self.norm_out(self.norm_final(x)) * (1 + scale) + shift)


@dataclass
class CogVideoXInputs:
    """One model call. `latents` [B, F, C_in, H, W] in the model dtype (I2V: noisy and image latents
    concatenated on channels; 1.5: F even); `timesteps` [B] in training units; `context` [B, T, 4096]
    T5 states (T = max_text_seq_length with sin-cos or learned positions); `rope` the rotary table
    (`CogVideoXDiT.positional_tables`, computed once per run) or None to compute it here."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    rope: Rotary | None = None


class CogVideoXDiT(DiT):
    """CogVideoX 2B / 5B / 1.5 DiT. `forward(CogVideoXInputs) -> [B, F, C_out, H, W]` (v-prediction)."""

    plan = COGVIDEOX_PLAN

    def __init__(self, cfg: CogVideoXConfig):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.hidden_size, cfg.patch_size
        if cfg.patch_size_t is None:
            self.patch = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p, bias=cfg.patch_bias)
        else:  # diffusers' 1.5 patch projection always has a bias
            self.patch = nn.Linear(cfg.in_channels * p * p * cfg.patch_size_t, dim)
        self.text_proj = nn.Linear(cfg.text_embed_dim, dim)
        self.pos_embedding = None
        if cfg.use_learned_positional_embeddings:
            grid = self.trained_grid
            self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_text_seq_length + math.prod(grid), dim))
        self.time_in = MLPEmbedder(dim, cfg.time_embed_dim)
        self.ofs_in = MLPEmbedder(cfg.ofs_embed_dim, cfg.ofs_embed_dim) if cfg.ofs_embed_dim else None
        self.layers = nn.ModuleList(CogVideoXBlock(cfg) for _ in range(cfg.num_layers))
        self.head_out = Head(cfg)

    @property
    def trained_grid(self) -> tuple[int, int, int]:
        """The token grid of the checkpoint's sample size (its positions table's layout)."""
        c = self.cfg
        return ((c.sample_frames - 1) // c.temporal_compression_ratio + 1, c.sample_height // c.patch_size,
                c.sample_width // c.patch_size)

    def grid(self, latents_shape) -> tuple[int, int, int]:
        """(frames, rows, columns) of patches for latents [B, F, C, H, W]."""
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t or 1
        return latents_shape[1] // pt, latents_shape[3] // p, latents_shape[4] // p

    def positional_tables(self, grid: tuple[int, int, int], text_len: int, device=None) -> Rotary | None:
        """The rotary table over [text, video] for a token grid (None for sin-cos models)."""
        if not self.cfg.use_rotary_positional_embeddings:
            return None
        return joint_rope(*rope_table(self.cfg, grid, device), text_len)

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, F, C, H, W] -> [B, F'·H'·W', D]."""
        b, f, c, h, w = latents.shape
        p, pt = self.cfg.patch_size, self.cfg.patch_size_t
        if pt is None:
            x = self.patch(latents.reshape(-1, c, h, w))  # [B·F, D, H', W']
            return x.view(b, f, *x.shape[1:]).flatten(3).transpose(2, 3).flatten(1, 2)
        x = latents.permute(0, 1, 3, 4, 2).reshape(b, f // pt, pt, h // p, p, w // p, p, c)
        return self.patch(x.permute(0, 1, 3, 5, 7, 2, 4, 6).flatten(4, 7).flatten(1, 3))

    def positions(self, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        """What is added to the video tokens: the learned table (I2V, at the trained size), else the
        sin-cos table for this grid (2B; and learned models at another frame count, as diffusers)."""
        if not self.cfg.sincos_positions and self.pos_embedding is None:
            return None
        if self.pos_embedding is not None:
            if grid[1:] != self.trained_grid[1:]:
                raise ValueError(f"this CogVideoX checkpoint has learned positions for a {self.trained_grid[1]}x"
                                 f"{self.trained_grid[2]} token grid only, got {grid[1]}x{grid[2]}")
            if grid == self.trained_grid:
                return self.pos_embedding[:, self.cfg.max_text_seq_length:].to(like.dtype)
        return sincos_table(self.cfg, grid, like.device)[None].to(like.dtype)

    def embed(self, inp: CogVideoXInputs) -> Hidden:
        """Patches (+ positions), projected text, the time (+ ofs) embedding, the rotary table."""
        cfg = self.cfg
        grid = self.grid(inp.latents.shape)
        txt = self.text_proj(inp.context)
        x = self.patchify(inp.latents)
        pos = self.positions(grid, x)
        if pos is not None:
            if txt.shape[1] != cfg.max_text_seq_length:  # the table is laid out for exactly that many
                raise ValueError(f"CogVideoX positions need {cfg.max_text_seq_length} text tokens, got {txt.shape[1]}")
            x = x + pos
        dtype = inp.latents.dtype
        temb = self.time_in(time_embedding(inp.timesteps, cfg.hidden_size, cfg.freq_shift).to(dtype))
        if self.ofs_in is not None:  # 1.5 I2V: the pipelines pass one ofs = 2 for the batch
            ofs = torch.full((1,), 2.0, device=x.device)
            temb = temb + self.ofs_in(time_embedding(ofs, cfg.ofs_embed_dim, cfg.freq_shift).to(dtype))
        rope = inp.rope
        if rope is None:
            rope = self.positional_tables(grid, txt.shape[1], x.device)
        return Hidden((x, txt), (temb, rope, grid))

    def head(self, h: Hidden) -> torch.Tensor:
        """Project each patch back and rearrange patches into latents [B, F, C_out, H, W]."""
        x, (temb, _, (f, hh, ww)) = h.streams[0], h.consts
        out = self.head_out(x, temb)
        b, p, pt = x.shape[0], self.cfg.patch_size, self.cfg.patch_size_t
        if pt is None:
            out = out.reshape(b, f, hh, ww, -1, p, p).permute(0, 1, 4, 2, 5, 3, 6)
            return out.reshape(b, f, -1, hh * p, ww * p)
        out = out.reshape(b, f, hh, ww, -1, pt, p, p).permute(0, 1, 5, 4, 2, 6, 3, 7)
        return out.reshape(b, f * pt, -1, hh * p, ww * p)
