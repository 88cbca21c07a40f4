"""Sequence-parallel attention ops: Ulysses (all-to-all between sequence and heads), Ring (K/V passed
round the ring, partial results merged by log-sum-exp) and USP (Ulysses inside, Ring across).

Each op has the attention-op contract (q, k, v [B, S, H, D] -> [B, S, H, D], optional key mask
[B, S]) over this rank's shard of the sequence. The shards of all ranks together are the whole
sequence in some order; attention is indifferent to the order of keys so long as each key's mask
travels with it, and every query's output returns to the rank that holds it.

Padding: when a stream does not divide among the ranks, the sharding wrapper pads it and sets
`SeqState.pad_mask` (this rank's valid tokens); an op then masks the padded keys even where the
model passes no mask. Whether a mask exists is the same on every rank (padding is decided from
global shapes), so the ranks always agree on which collectives run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditserve.parallel.groups import Axis

log = logging.getLogger(__name__)


@dataclass
class SeqState:
    """Per-forward facts the sharding wrapper shares with the ops of its DiT."""

    pad_mask: torch.Tensor | None = None  # [S_local] bool over the joint local sequence, or None

    def key_mask(self, mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The key mask to apply: the model's (already sliced, padding included) or the padding's."""
        if mask is not None:
            return mask.bool()
        if self.pad_mask is None:
            return None
        return self.pad_mask[None].expand(batch, -1)


# -- partial attention with its log-sum-exp ------------------------------------------------------

def attention_lse(q, k, v, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over one chunk of keys: out [B, S, H, D] (float32) and the log-sum-exp of the
    scores lse [B, H, S] (float32; -inf for a query whose keys in this chunk are all masked, with
    out 0 there). On CUDA without a mask, a fused kernel returns both (cuDNN's where it runs, as
    SDPA prefers on Hopper; else flash); elsewhere the math path."""
    if q.is_cuda and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        return _fused_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    scores = qh @ kh.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0)[..., None])
    out = (probs @ vh).transpose(1, 2)
    return out, lse


_CUDNN_LSE = [torch.backends.cudnn.is_available()]  # cleared at cuDNN's first refusal


def _fused_lse(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, S, D] inputs -> out [B, S, H, D] float32, lse [B, H, S] float32."""
    b, h, s, _ = q.shape
    if _CUDNN_LSE[0]:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
            return out.transpose(1, 2).float(), lse.reshape(b, h, s).float()
        except RuntimeError as exc:
            log.info("ring attention: cuDNN refused (%s); the flash kernel from now on", exc)
            _CUDNN_LSE[0] = False
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return out.transpose(1, 2).float(), lse.float()


def merge_partials(out, lse, part, part_lse):
    """Combine two partial attentions over disjoint key sets (numerically safe when either saw no
    key: lse -inf)."""
    if out is None:
        return part, part_lse
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isfinite(new), new, 0)
    w_old = torch.exp(lse - safe).transpose(1, 2)[..., None]
    w_new = torch.exp(part_lse - safe).transpose(1, 2)[..., None]
    return out * w_old + part * w_new, new


# -- collectives ---------------------------------------------------------------------------------

def seq_to_heads(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """[..., B, S, H, D] sharded on S -> [..., B, U*S, H/U, D] sharded on H (rank order along S)."""
    *lead, b, s, h, d = x.shape
    u = axis.size
    send = x.reshape(*lead, b, s, u, h // u, d).movedim(-3, 0).contiguous()  # [U, ..., B, S, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)
    return recv.movedim(0, -4).reshape(*lead, b, u * s, h // u, d)  # [..., B, U, S, ...] -> [..., B, U*S, ...]


def heads_to_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """The inverse of `seq_to_heads` for one tensor: [B, U*S, H/U, D] -> [B, S, H, D]."""
    b, us, hu, d = x.shape
    u = axis.size
    send = x.reshape(b, u, us // u, hu, d).movedim(1, 0).contiguous()  # [U, B, S, H/U, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=axis.group)
    return recv.movedim(0, 2).reshape(b, us // u, u * hu, d)  # [B, S, U, H/U, D] -> [B, S, H, D]


def all_gather_cat(x: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """Concatenate every member's `x` along `dim`, in group order."""
    parts = [torch.empty_like(x) for _ in range(axis.size)]
    dist.all_gather(parts, x.contiguous(), group=axis.group)
    return torch.cat(parts, dim=dim)


# -- the ops ---------------------------------------------------------------------------------------

class UlyssesAttention:
    """All-to-all q, k, v from sequence shards to head shards, attend over the whole sequence with
    `inner` (the layer's original op, or a RingAttention for USP), all-to-all back."""

    def __init__(self, axis: Axis, inner, state: SeqState):
        self.axis, self.inner, self.state = axis, inner, state
        self.__name__ = f"ulysses{axis.size}({getattr(inner, '__name__', inner)})"

    def __call__(self, q, k, v, mask=None):
        if q.shape[2] % self.axis.size:
            raise ValueError(f"Ulysses degree {self.axis.size} needs the heads on this rank ({q.shape[2]}) "
                             f"divisible by it")
        key_mask = self.state.key_mask(mask, q.shape[0])
        q, k, v = seq_to_heads(torch.stack([q, k, v]), self.axis).unbind(0)
        if key_mask is None:
            out = self.inner(q, k, v)
        else:
            out = self.inner(q, k, v, mask=all_gather_cat(key_mask, self.axis, dim=1))
        return heads_to_seq(out.to(q.dtype), self.axis)


class RingAttention:
    """Each rank keeps its queries; the K/V shards (with their key mask) travel round the ring, one
    hop per partial attention, and the partials merge by log-sum-exp. The next shard is in flight
    while the current one is attended."""

    def __init__(self, axis: Axis, state: SeqState | None = None):
        self.axis, self.state = axis, state or SeqState()
        self.__name__ = f"ring{axis.size}"

    def __call__(self, q, k, v, mask=None):
        key_mask = self.state.key_mask(mask, q.shape[0])
        # one buffer per hop: k and v stacked, plus the mask as a channel when there is one
        packet = torch.stack([k, v]).contiguous()
        packet_mask = None if key_mask is None else key_mask.to(torch.uint8).contiguous()
        out = lse = None
        size, rank = self.axis.size, self.axis.rank
        send_to, recv_from = self.axis.global_rank((rank + 1) % size), self.axis.global_rank((rank - 1) % size)
        for hop in range(size):
            pending = []
            if hop < size - 1:
                pending, incoming = self._exchange(packet, packet_mask, send_to, recv_from)
            part, part_lse = attention_lse(q, packet[0], packet[1], None if packet_mask is None else packet_mask.bool())
            out, lse = merge_partials(out, lse, part, part_lse)
            for work in pending:
                work.wait()
            if hop < size - 1:
                packet, packet_mask = incoming
        return out.to(q.dtype)

    def _exchange(self, packet, packet_mask, send_to, recv_from):
        ops, incoming = [], [torch.empty_like(packet), None if packet_mask is None else torch.empty_like(packet_mask)]
        for tensor, buf in ((packet, incoming[0]), (packet_mask, incoming[1])):
            if tensor is None:
                continue
            ops.append(dist.P2POp(dist.isend, tensor, send_to, self.axis.group))
            ops.append(dist.P2POp(dist.irecv, buf, recv_from, self.axis.group))
        return dist.batch_isend_irecv(ops), tuple(incoming)

