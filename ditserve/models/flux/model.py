"""FLUX.1: a rectified-flow MMDiT with double-stream then single-stream blocks.

Forward = embed -> blocks -> head (models/common/dit.py). Every block maps (img, txt, vec, rope) ->
(img, txt), so caching, offload, sequence sharding and compilation can wrap the list from outside.
Shapes: img [B, L, D], txt [B, T, D], vec [B, D]; rope: a Rotary table [T + L, head_dim].
The double-stream block and the modulation layers are shared with Qwen-Image and HunyuanVideo, the
single-stream block with HunyuanVideo (models/common/mmdit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ditserve.models.common.dit import DiT, Hidden
from ditserve.models.common.embeddings import MLPEmbedder, timestep_embedding
from ditserve.models.common.mmdit import DoubleStreamBlock, LastLayer, SingleStreamBlock
from ditserve.models.common.rope import Rotary, rope_tables
from ditserve.models.flux.config import FluxConfig
from ditserve.models.flux.plan import FLUX_PLAN


@dataclass
class FluxInputs:
    """Per-step inputs; `timesteps` and `guidance` are in [0, 1] (sigma units). `rope` may be
    computed once per run (`positional_tables`); None computes it from the ids."""

    img: torch.Tensor
    txt: torch.Tensor
    pooled: torch.Tensor
    timesteps: torch.Tensor
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    guidance: torch.Tensor | None = None
    rope: Rotary | None = None


class FluxDiT(DiT):
    plan = FLUX_PLAN

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

    def positional_tables(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> Rotary:
        return rope_tables(torch.cat([txt_ids, img_ids]), self.cfg.axes_dims_rope, self.cfg.theta)

    def embed(self, inp: FluxInputs) -> Hidden:
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
        rope = inp.rope if inp.rope is not None else self.positional_tables(inp.img_ids, inp.txt_ids)
        return Hidden((img, txt), (vec, rope))

    def head(self, h: Hidden) -> torch.Tensor:
        (img, _), (vec, _) = h.streams, h.consts
        return self.final_layer(img, vec)
