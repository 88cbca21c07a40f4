"""Qwen-Image: a dual-stream MMDiT (60 double-stream blocks) over packed 2x2 latent patches and
Qwen2.5-VL text tokens, with multi-scale rotary positions (MSRoPE).

Forward = embed -> blocks -> head (models/common/dit.py); every block maps
(img, txt, vec, rope, mask, mod_index) -> (img, txt).
Shapes: img [B, L, D] (the target image's patches, then any condition images'), txt [B, T, D],
vec [B, D]; rope: a Rotary table over the joint (txt, img) sequence; mask: a key mask [B, T + L]
when some text is padding (cond and uncond prompts of different lengths in one batch), else None.
With `zero_cond_t` (Qwen-Image-Edit-2511) vec is [B, 2, D] (timestep t, timestep 0) and
mod_index [B, L] picks per image token: 0 for the image being generated, 1 for input images
(per-token modulation, models/common/mmdit.py); otherwise mod_index is None.

MSRoPE, as diffusers' `QwenEmbedRope` places positions (frame, row, column):
- image k (0 = the image being generated, 1.. = edit conditions) sits on frame k; its rows and
  columns are centred on 0: -(h - h//2) .. h//2 - 1 for h patch rows, likewise columns;
- text token j continues on the diagonal after the largest image: (m + j, m + j, m + j) with
  m = max over images of max(h//2, w//2).
With `use_layer3d_rope` (Qwen-Image-Layered, diffusers' `QwenEmbedLayer3DRope`) the last grid is
the input image, on frame -1, and m is at least the number of generated layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ditserve.models.common.dit import DiT, Hidden
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.mmdit import EPS, DoubleStreamBlock, LastLayer
from ditserve.models.common.rope import Rotary, rope_tables
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.plan import QWEN_IMAGE_PLAN

Grid = tuple[int, int]  # (rows, columns) of 2x2 patches


def _centred(n: int) -> torch.Tensor:
    return torch.arange(n) - (n - n // 2)


def image_ids(grids: Sequence[Grid], device=None, frames: Sequence[int] | None = None) -> torch.Tensor:
    """Positions [sum(h * w), 3] of the packed patches of each image, row-major, image after image;
    image k on frame `frames[k]` (default k)."""
    ids = []
    for frame, (h, w) in zip(range(len(grids)) if frames is None else frames, grids):
        pos = torch.zeros(h, w, 3)
        pos[..., 0] = frame
        pos[..., 1] = _centred(h)[:, None]
        pos[..., 2] = _centred(w)[None, :]
        ids.append(pos.reshape(h * w, 3))
    return torch.cat(ids).to(device)


def text_ids(grids: Sequence[Grid], txt_len: int, device=None, min_start: int = 0) -> torch.Tensor:
    """Positions [T, 3] of the text tokens: on the diagonal, after the largest image grid (and at
    least at `min_start`)."""
    start = max(min_start, *(max(h // 2, w // 2) for h, w in grids))
    return (torch.arange(start, start + txt_len)[:, None].expand(txt_len, 3)).float().to(device)


@dataclass
class QwenImageInputs:
    """Per-step inputs; `timesteps` are in [0, 1] (sigma units); `txt_mask` [B, T] (True = token)
    is None when no text is padding. `rope` may be computed once per run; None computes it.
    `target_len`: how many leading image tokens belong to the first image grid (the image being
    generated); with `zero_cond_t` the tokens after it are modulated at timestep 0; None: all.
    `t_cond` [B] (int): the row of the additional timestep embedding (`use_additional_t_cond`);
    None: row 0, as diffusers' pipelines always pass."""

    img: torch.Tensor
    txt: torch.Tensor
    timesteps: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    txt_mask: torch.Tensor | None = None
    rope: Rotary | None = None
    target_len: int | None = None
    t_cond: torch.Tensor | None = None


class QwenImageDiT(DiT):
    plan = QWEN_IMAGE_PLAN

    def __init__(self, cfg: QwenImageConfig):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(256, dim)
        if cfg.use_additional_t_cond:
            self.t_cond_in = nn.Embedding(2, dim)
        self.txt_norm = nn.RMSNorm(cfg.joint_attention_dim, eps=EPS)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(dim, heads, cfg.mlp_ratio) for _ in range(cfg.num_layers)
        )
        self.final_layer = LastLayer(dim, cfg.out_dim)

    def positions(self, grids: Sequence[Grid], txt_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (img_ids, txt_ids) of image grids (the generated ones first) and text tokens,
        as this checkpoint's RoPE places them (MSRoPE, or layered 3D RoPE: see the module docstring)."""
        if not self.cfg.use_layer3d_rope:
            return image_ids(grids, device), text_ids(grids, txt_len, device)
        layers = len(grids) - 1
        return (image_ids(grids, device, frames=[*range(layers), -1]),
                text_ids(grids, txt_len, device, min_start=layers))

    def positional_tables(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> Rotary:
        """The rotary table over (txt, img)."""
        return rope_tables(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.cfg.theta)

    def embed(self, inp: QwenImageInputs) -> Hidden:
        """Patch/text projections, the timestep vector(s), the rotary tables, the key mask and,
        with zero_cond_t, the per-token modulation index."""
        img = self.img_in(inp.img)
        # as diffusers: the timestep is rounded to the model dtype, then embedded at scale 1000
        t = inp.timesteps.to(img.dtype)
        if self.cfg.zero_cond_t:
            t = torch.stack([t, t * 0], dim=1)  # [B, 2]: generated-image tokens at t, input images at 0
        vec = self.time_in(timestep_embedding(t.flatten(), scale=1000.0).to(img.dtype)).unflatten(0, t.shape)
        if self.cfg.use_additional_t_cond:
            # made on the device: the embed segment may be captured in a CUDA graph (no host copies)
            rows = inp.t_cond if inp.t_cond is not None else torch.zeros(len(img), dtype=torch.long, device=img.device)
            extra = self.t_cond_in(rows).to(img.dtype)
            vec = vec + (extra[:, None] if vec.ndim == 3 else extra)
        txt = self.txt_in(self.txt_norm(inp.txt))
        rope = inp.rope if inp.rope is not None else self.positional_tables(inp.img_ids, inp.txt_ids)
        mod_index = None
        if self.cfg.zero_cond_t:
            target = img.shape[1] if inp.target_len is None else inp.target_len
            mod_index = (torch.arange(img.shape[1], device=img.device) >= target).long().expand(len(img), -1)
        return Hidden((img, txt), (vec, rope, joint_mask(inp.txt_mask, img.shape[1]), mod_index))

    def head(self, h: Hidden) -> torch.Tensor:
        return self.final_layer(h.streams[0], h.consts[0])


def joint_mask(txt_mask: torch.Tensor | None, img_len: int) -> torch.Tensor | None:
    """The key mask [B, T + L] over (txt, img) when some text is padding, else None."""
    if txt_mask is None:
        return None
    return torch.cat([txt_mask.bool(), txt_mask.new_ones(txt_mask.shape[0], img_len, dtype=torch.bool)], dim=1)
