"""UMT5 prompt encoding as the Wan pipelines do it: cleaned text, padded to a fixed length, the
padded positions' states zeroed (no mask reaches the DiT)."""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
import transformers

from ditserve.encoders.text import _warn_truncated, load_pretrained


def clean_prompt(text: str) -> str:
    """ftfy's text repair (when installed, as diffusers), HTML entities unescaped twice, runs of
    whitespace collapsed."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Encoder:
    """UMT5 encoder: last hidden states [N, max_length, D], zero past each prompt's tokens."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype) -> "UMT5Encoder":
        return cls(transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder)),
                   load_pretrained(transformers.UMT5EncoderModel, folder, device, dtype))

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        prompts = [clean_prompt(p) for p in prompts]
        tok = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        _warn_truncated(self.tokenizer, prompts, tok.input_ids, max_length, "UMT5")
        device = self.model.device
        states = self.model(tok.input_ids.to(device), tok.attention_mask.to(device)).last_hidden_state
        keep = tok.attention_mask.to(device).bool()[..., None]
        return torch.where(keep, states, torch.zeros((), dtype=states.dtype, device=device))
