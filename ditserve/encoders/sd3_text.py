"""Stable Diffusion 3's three text encoders, combined as diffusers' StableDiffusion3Pipeline does.

CLIP-L and CLIP-G (`CLIPTextModelWithProjection`) each give their penultimate hidden states (77
tokens) and a projected pooled vector; T5-XXL gives `max_sequence_length` tokens. The two CLIP
sequences are joined along the feature axis, zero-padded to T5's width and put before the T5
tokens; the pooled vectors are concatenated. A folder without T5 (`text_encoder_3` null) gets zeros
in T5's place, `joint_attention_dim` wide.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from ditserve.encoders.text import T5SequenceEncoder, _warn_truncated, load_pretrained

log = logging.getLogger(__name__)


@dataclass
class SD3Text:
    """Text tokens [N, 77 + T, joint_attention_dim] and the pooled vector [N, P_L + P_G]."""

    txt: torch.Tensor
    pooled: torch.Tensor


class ClipProjectedEncoder:
    """A CLIP text model with projection: (penultimate hidden states, projected pooled vector)."""

    def __init__(self, tokenizer, model, max_length: int):
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype,
             max_length: int | None = None) -> ClipProjectedEncoder:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        model = load_pretrained(transformers.CLIPTextModelWithProjection, folder, device, dtype)
        return cls(tokenizer, model, max_length or tokenizer.model_max_length)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids
        _warn_truncated(self.tokenizer, prompts, ids, self.max_length, "CLIP")
        out = self.model(ids.to(self.model.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class SD3TextEncoder:
    """CLIP-L + CLIP-G + T5 (or zeros) -> SD3Text."""

    def __init__(self, clip_l: ClipProjectedEncoder, clip_g: ClipProjectedEncoder, t5: T5SequenceEncoder | None,
                 joint_dim: int, dtype: torch.dtype):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.joint_dim, self.dtype = joint_dim, dtype

    @classmethod
    def load(cls, path: Path, joint_dim: int, device, dtype: torch.dtype, with_t5: bool) -> SD3TextEncoder:
        """The encoders of an SD3 folder; both CLIPs use the first tokenizer's length, as diffusers."""
        clip_l = ClipProjectedEncoder.load(path / "text_encoder", path / "tokenizer", device, dtype)
        clip_g = ClipProjectedEncoder.load(path / "text_encoder_2", path / "tokenizer_2", device, dtype,
                                           max_length=clip_l.max_length)
        t5 = T5SequenceEncoder.load(path / "text_encoder_3", path / "tokenizer_3", device, dtype) if with_t5 else None
        return cls(clip_l, clip_g, t5, joint_dim, dtype)

    def models(self) -> dict[str, torch.nn.Module]:
        named = {"text_encoder": self.clip_l.model, "text_encoder_2": self.clip_g.model}
        return named | ({"text_encoder_3": self.t5.model} if self.t5 is not None else {})

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_sequence_length: int) -> SD3Text:
        hidden_l, pooled_l = self.clip_l(prompts)
        hidden_g, pooled_g = self.clip_g(prompts)
        clip = torch.cat([hidden_l, hidden_g], dim=-1).to(self.dtype)
        if self.t5 is not None:
            t5 = self.t5(prompts, max_sequence_length)
        else:
            t5 = torch.zeros(len(prompts), max_sequence_length, self.joint_dim, device=clip.device, dtype=self.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return SD3Text(torch.cat([clip, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1))
