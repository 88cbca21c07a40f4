"""UMT5 prompt encoding as the Wan pipelines do it (diffusers' `WanPipeline._get_t5_prompt_embeds`):
cleaned text, padded to a fixed length (512), each prompt's states kept for its own tokens and zeroed
after them (no attention mask reaches the DiT)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch
import transformers

from ditserve.encoders.text import _warn_truncated, load_pretrained

MAX_SEQUENCE_LENGTH = 512  # the Wan DiT's text length (its I2V cross-attention splits on it)


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


def component_class(index: dict, name: str, default: str):
    """The transformers class a pipeline folder's model_index.json names for `name`."""
    library, cls = index.get(name, [None, None])
    return getattr(transformers, cls if library == "transformers" and cls else default)


class UMT5Encoder:
    """UMT5 encoder: last hidden states [N, max_length, D] in the model's dtype, zero after each
    prompt's tokens (its `</s>` included in the kept part)."""

    def __init__(self, tokenizer, model):
        self.tokenizer, self.model = tokenizer, model

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype,
             tokenizer_cls=transformers.AutoTokenizer, model_cls=transformers.UMT5EncoderModel) -> UMT5Encoder:
        tokenizer = tokenizer_cls.from_pretrained(str(tokenizer_folder))
        return cls(tokenizer, load_pretrained(model_cls, folder, device, dtype))

    @classmethod
    def from_pipeline_folder(cls, path: Path, device, dtype: torch.dtype) -> UMT5Encoder:
        """`tokenizer/` and `text_encoder/` of a Wan folder, through the classes its model_index.json
        names (as diffusers loads them)."""
        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        return cls.load(path / "text_encoder", path / "tokenizer", device, dtype,
                        tokenizer_cls=component_class(index, "tokenizer", "T5TokenizerFast"),
                        model_cls=component_class(index, "text_encoder", "UMT5EncoderModel"))

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
        prompts = [clean_prompt(p) for p in prompts]
        tok = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        _warn_truncated(self.tokenizer, prompts, tok.input_ids, max_length, "UMT5")
        device = self.model.device
        mask = tok.attention_mask.to(device)
        states = self.model(tok.input_ids.to(device), mask).last_hidden_state.to(self.model.dtype)
        # the reference keeps the first `mask.sum()` positions of each row and zero-fills the rest
        keep = torch.arange(max_length, device=device)[None] < mask.gt(0).sum(dim=1, keepdim=True)
        return torch.where(keep[..., None], states, torch.zeros((), dtype=states.dtype, device=device))
