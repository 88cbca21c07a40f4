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
class SequenceLayout:
    """How sequence parallelism (Ulysses, Ring) shards a DiT's `Hidden` (parallel/sequence.py).

    Every stream is cut along its token axis (dim 1), padded where it does not divide; per-token
    tables are cut the same way, stream by stream, in the order the blocks join the streams.
    - `joint_order`: the streams in the order the blocks concatenate them for self-attention
      (FLUX, Qwen-Image: (1, 0), text then image; Wan: (0,)).
    - `consts`: one entry per const of `Hidden`: "same" (replicated), "rope" (a Rotary whose rows run
      over the joint sequence), "key_mask" (None or [B, joint sequence]), "per_token" (dim 1 runs
      over stream 0's tokens when the tensor has 4 dims, as Wan's per-token modulation
      [B, L, 6, D], or 2 dims, as Qwen-Image's per-token modulation index [B, L]; otherwise
      replicated).
    - `self_attention_sites`: attention sites over the sharded sequence (they communicate); other
      sites of `attention_sites` (cross-attention to replicated text) attend locally, unchanged.
    - `stream_attention_sites`: (site, streams) for self-attention over some streams only, joined in
      that order (SD3.5-Medium's image-only second attention: ("attn2_op", (0,))); they communicate
      too, with those streams' own padding.
    - `head_streams`: the streams the head reads (only these are gathered back).
    """

    joint_order: tuple[int, ...] = (0,)
    consts: tuple[str, ...] = ()
    self_attention_sites: tuple[str, ...] = ("attn_op",)
    stream_attention_sites: tuple[tuple[str, tuple[int, ...]], ...] = ()
    head_streams: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class TensorLayout:
    """How tensor parallelism splits each block (parallel/tensor.py); paths are block-relative
    fnmatch patterns of nn.Linear modules.

    - `column`: split on output features. A weight the checkpoint stores as several tensors (fused
      q/k/v, FLUX's single-block q/k/v/mlp projection) is split tensor by tensor, so every rank
      holds its heads of q, of k and of v.
    - `row`: split on input features; partial outputs are summed across ranks, the bias added once.
    - `row_segments`: (pattern, block attributes) for a row linear whose input is a concatenation
      (FLUX single block `linear2` over [attention, MLP]: ("dim", "mlp_hidden")); each segment is
      split on its own.
    - `divide`: block-relative int attributes that count heads or widths, divided by the TP size.
    - `norms`: RMSNorm modules over a width that TP splits (Wan's QK norm across all heads): their
      statistics are summed across ranks.
    """

    column: tuple[str, ...] = ()
    row: tuple[str, ...] = ()
    row_segments: tuple[tuple[str, tuple[str, ...]], ...] = ()
    divide: tuple[str, ...] = ()
    norms: tuple[str, ...] = ()


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
      "attn_op"; Wan: its self- and cross-attention modules' ops); a backend replaces them all, but
      the fp8 backend leaves `cross_attention_sites` (queries of the video, keys of the text: 1.5 % of
      Wan's attention FLOPs, where the kernel has nothing to gain and its quantise passes cost) to SDPA.
    - `qk_rope_site`: the block attribute holding the QK-norm + RoPE op that a fused kernel may
      replace (None: the model has no such site).
    - `teacache`: the model config -> its published TeaCache fit, or None where none is published
      for that checkpoint (None for the whole family: none published). Step caches measure and
      reuse the first stream of `Hidden` (the image or video tokens).
    - `token_sites`: block-relative paths of the pieces that map every token on its own along dim 1
      — feed-forward modules ([B, L, D] -> [B, L, D]), or block methods and op attributes whose
      positional tensors are per token (or broadcast over the tokens, [B, 1, D]; a `Rotary` by its
      rows) and whose keyword arguments are not (a cross-attention's context) — which may run over
      the sequence in chunks (accel/activations.py). A block without one (or holding None) is skipped.
      `token_sites_in_place`: those of them whose first argument the caller never uses again and whose
      result has its shape and dtype (a rotary embedding): chunked, each chunk's result is written back
      into it, so no second tensor of that size is made.
    - `eager_kernels`: (block-relative op slot, kernel name of accel/token_kernels.py) pairs: slots whose
      per-token float32 ops a one-pass Triton kernel computes when the DiT runs eager on CUDA (compiled,
      inductor fuses the same ops). A kernel may write over an input its slot's caller drops: `rope_`
      over its input (a `token_sites_in_place` slot), `gated_add` over its second argument.
    - `sequence`, `tensor`: the sequence- and tensor-parallel layouts (None: not supported).
    """

    block_lists: tuple[str, ...]
    head: str
    fp8: tuple[str, ...] = ("*",)
    fp8_keep: tuple[str, ...] = ()
    attention_sites: tuple[str, ...] = ("attn_op",)
    cross_attention_sites: tuple[str, ...] = ()
    qk_rope_site: str | None = None
    teacache: Callable[[Any], TeaCacheFit | None] | None = None
    token_sites: tuple[str, ...] = ()
    token_sites_in_place: tuple[str, ...] = ()
    eager_kernels: tuple[tuple[str, str], ...] = ()
    sequence: SequenceLayout | None = None
    tensor: TensorLayout | None = None
