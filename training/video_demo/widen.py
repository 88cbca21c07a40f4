"""Widen an ``AutoencoderKLWan``'s decoder (``decoder_base_dim``) without changing what it decodes.

Net2Net-style: every decoder channel is doubled, the copy carrying the same value, so each layer's
input weights are split between the two copies. A channel's value and its copy's are equal, so any
split ``a + b = w`` leaves the output unchanged; a random split per weight makes the copies' outgoing
weights differ, so their gradients differ and the fine-tune can pull them apart (an even split would
keep them equal forever). Wan's RMS norm divides by the channels' root mean square, which doubling
keeps; the mid-block attention's single head would see twice the dot product under a sqrt(2) larger
scale, so its queries are scaled by 1/sqrt(2). Two layers pack groups along the channel axis (the
temporal upsampler's ``time_conv``: two frames x C; ``to_qkv``: q, k, v x C): they double within
each group. The encoder, the quant convolutions and so the latent space stay as they are.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKLWan


def _grouped(name: str) -> int:
    """How many channel groups the layer's output axis packs (1 for a plain layer)."""
    if "time_conv" in name:
        return 2
    if "to_qkv" in name:
        return 3
    return 1


def _double_out(p: torch.Tensor, groups: int) -> torch.Tensor:
    g = p.reshape(groups, p.shape[0] // groups, *p.shape[1:])
    return torch.cat([g, g], 1).reshape(2 * p.shape[0], *p.shape[1:])


def _split_in(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    share = torch.rand(p.shape, generator=gen, dtype=p.dtype)  # copy 1 gets share * w, copy 2 the rest
    return torch.cat([p * share, p * (1 - share)], 1)


@torch.no_grad()
def widen_decoder(vae: AutoencoderKLWan, seed: int = 0) -> AutoencoderKLWan:
    """A copy of ``vae`` whose decoder has twice the channels and decodes the same pixels."""
    base = vae.config.decoder_base_dim or vae.config.base_dim
    # without the config's private keys: "_use_default_values" would reset decoder_base_dim to its default
    cfg = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    wide = AutoencoderKLWan.from_config({**cfg, "decoder_base_dim": 2 * base}).to(vae.dtype)
    state = vae.state_dict()
    gen = torch.Generator().manual_seed(seed)
    for name, new in wide.state_dict().items():
        p = state[name]
        if name.startswith("decoder."):
            if p.shape[0] * 2 == new.shape[0]:
                p = _double_out(p, _grouped(name))
            if p.ndim >= 4 and p.shape[1] * 2 == new.shape[1]:
                p = _split_in(p, gen)
            if "to_qkv" in name:  # the q third: queries over twice the channels, same logits
                p = p.clone()
                p[:new.shape[0] // 3] /= math.sqrt(2)
        if p.shape != new.shape:
            raise ValueError(f"cannot widen {name}: {tuple(p.shape)} -> {tuple(new.shape)}")
        new.copy_(p)
    return wide
