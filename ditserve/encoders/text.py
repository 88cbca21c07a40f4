"""CLIP (pooled) and T5 (sequence) prompt encoders, tokenised as the diffusers pipelines do."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import transformers

log = logging.getLogger(__name__)

# transformers renamed `torch_dtype` to `dtype` (4.56); accept both major lines.
_DTYPE_KW = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

# Set by parallel/ while a pipeline loads tensor-parallel: it builds its own shard of the classes it
# knows (T5, UMT5: parallel/text_tp.py) and returns None for the others, which load whole.
PretrainedLoader = Callable[[type, Path, object, torch.dtype], "torch.nn.Module | None"]
_LOADER: ContextVar[PretrainedLoader | None] = ContextVar("ditserve_pretrained_loader", default=None)


@contextmanager
def pretrained_loading(loader: PretrainedLoader) -> Iterator[None]:
    """While active, `load_pretrained(cls, folder, device, dtype)` first asks `loader` with the same
    arguments and uses the model it returns, if any."""
    token = _LOADER.set(loader)
    try:
        yield
    finally:
        _LOADER.reset(token)


def load_pretrained(cls, folder: Path, device, dtype: torch.dtype,
                    prune: Callable[[torch.nn.Module], None] | None = None):
    """Load a transformers model from `folder` in `dtype`, on `device`, in eval mode; `prune(model)`, if
    given, drops the parts the caller never runs before the model moves to `device`."""
    loader = _LOADER.get()
    model = loader(cls, folder, device, dtype) if loader is not None else None
    if model is None:
        model = cls.from_pretrained(str(folder), **{_DTYPE_KW: dtype})
    if prune is not None:
        prune(model)
    return model.to(device).eval().requires_grad_(False)


def _warn_truncated(tokenizer, prompts: list[str], ids: torch.Tensor, max_length: int, name: str) -> None:
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        log.warning("%s: prompt truncated to %d tokens", name, max_length)


class ClipPooledEncoder:
    """CLIP text model; its pooled output conditions the DiT's modulation vector."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model
        self.max_length = tokenizer.model_max_length

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype) -> "ClipPooledEncoder":
        return cls(transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder)),
                   load_pretrained(transformers.CLIPTextModel, folder, device, dtype))

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids
        _warn_truncated(self.tokenizer, prompts, ids, self.max_length, "CLIP")
        out = self.model(ids.to(self.model.device), output_hidden_states=False)
        return out.pooler_output.to(self.model.dtype)


class T5SequenceEncoder:
    """T5 encoder; its last hidden states are the DiT's text tokens, padded to a fixed length."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype) -> "T5SequenceEncoder":
        return cls(transformers.T5TokenizerFast.from_pretrained(str(tokenizer_folder)),
                   load_pretrained(transformers.T5EncoderModel, folder, device, dtype))

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length,
                             truncation=True, return_tensors="pt").input_ids
        _warn_truncated(self.tokenizer, prompts, ids, max_length, "T5")
        out = self.model(ids.to(self.model.device), output_hidden_states=False)[0]
        return out.to(self.model.dtype)
