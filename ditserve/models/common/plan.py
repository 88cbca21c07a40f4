"""Acceleration plans: what `accel/` and `parallel/` may do to a DiT, declared by the model as data.

`accel/` and `parallel/` read only this; they never name a model's internals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TeaCacheFit:
    """One published TeaCache fit: the polynomial (highest power first, as numpy.poly1d) that maps
    the relative L1 change of `signal` between steps to the change of the model's output, and the
    recipe it was published with.

    - `signal(dit, hidden)`: the timestep-modulated input the polynomial was fitted on, from the
      embed output (e.g. the first block's modulated image tokens, or the time modulation).
    - `threshold`, `warmup_steps`: the published default threshold and steps that always compute.
    - `source`: where the numbers come from.
    """

    coefficients: tuple[float, ...]
    signal: Callable[[Any, Any], Any]
    threshold: float
    warmup_steps: int = 1
    source: str = ""


@dataclass(frozen=True)
class DiTPlan:
    """Names are attributes of the DiT or, for linears, paths relative to a block.

    - `block_lists`: the ModuleLists whose blocks, in order, form `dit.blocks` (the list that
      caching, offload and sequence sharding walk).
    - `head`: the output module, compiled with the blocks.
    - `fp8`: fnmatch patterns of block-relative nn.Linear paths that may become FP8;
      `fp8_keep`: patterns that stay in high precision even when `fp8` matches (modulation layers:
      one row per sample, where FP8 saves nothing and costs accuracy).
    - `attention_sites`: block-relative paths of the attributes holding attention ops (FLUX:
      "attn_op"; Wan: its self- and cross-attention modules' ops); a backend replaces them all.
    - `qk_rope_site`: the block attribute holding the QK-norm + RoPE op that a fused kernel may
      replace (None: the model has no such site).
    - `teacache`: the model config -> its published TeaCache fit, or None where none is published
      for that checkpoint (None for the whole family: none published). Step caches measure and
      reuse the first stream of `Hidden` (the image or video tokens).
    """

    block_lists: tuple[str, ...]
    head: str
    fp8: tuple[str, ...] = ("*",)
    fp8_keep: tuple[str, ...] = ()
    attention_sites: tuple[str, ...] = ("attn_op",)
    qk_rope_site: str | None = None
    teacache: Callable[[Any], TeaCacheFit | None] | None = None
