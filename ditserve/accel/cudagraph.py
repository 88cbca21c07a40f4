"""Replay the whole DiT forward as one CUDA graph per input shape: no launch gaps, no host work."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def _tensors(inp) -> dict[str, torch.Tensor | None]:
    return dict(vars(inp))


class CudaGraphDiT(nn.Module):
    """Wraps a DiT whose forward is `dit(inputs_dataclass, pe)`; captures on first sight of a shape.

    Inputs are copied into static buffers, the graph replays, and the output is cloned so callers
    may keep it across steps.
    """

    def __init__(self, dit: nn.Module, warmup: int = 2):
        super().__init__()
        self.dit = dit
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    @property
    def cfg(self):
        return self.dit.cfg

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.dit, name)

    def _key(self, inp, pe) -> tuple:
        fields = _tensors(inp)
        return tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in fields.items()) + (
            tuple(pe[0].shape),)

    def _capture(self, inp, pe):
        static_inp = type(inp)(**{k: None if v is None else v.clone() for k, v in _tensors(inp).items()})
        static_pe = tuple(t.clone() for t in pe)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.dit(static_inp, static_pe)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.dit(static_inp, static_pe)
        self.pool = graph.pool()
        log.info("captured a CUDA graph for img %s", tuple(inp.img.shape))
        return graph, static_inp, static_pe, static_out

    @torch.no_grad()
    def forward(self, inp, pe):
        if not inp.img.is_cuda:
            return self.dit(inp, pe)
        key = self._key(inp, pe)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inp, pe)
        graph, static_inp, static_pe, static_out = self.graphs[key]
        for name, value in _tensors(inp).items():
            if value is not None:
                getattr(static_inp, name).copy_(value)
        for dst, src in zip(static_pe, pe):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()


def apply_cuda_graphs(dit: nn.Module) -> nn.Module:
    return CudaGraphDiT(dit)
