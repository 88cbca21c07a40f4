"""HunyuanVideo's LLaMA prompt encoding, as diffusers' `HunyuanVideoPipeline._get_llama_prompt_embeds`.

Each prompt is put into the video-description chat template, tokenised to 256 + `crop_start` tokens
(padded as the folder's tokenizer pads: right for HunyuanVideo), run through the LLaMA encoder, and
its `hidden_states[-3]` (the output of the third-to-last layer, before the final norm) kept from
token `crop_start` on: the template's system part is dropped, the user header, prompt and end
token stay. The attention mask is cropped the same way and goes to the DiT.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ditserve.encoders.text import load_pretrained

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START = 95  # the template's tokens before the user header, for HunyuanVideo's LLaMA 3 tokenizer
HIDDEN_LAYERS_TO_SKIP = 2  # hidden_states[-(2 + 1)]


@dataclass
class LlamaText:
    """Text states [N, T, D] and their mask [N, T] (1 = token), T = max_sequence_length."""

    states: torch.Tensor
    mask: torch.Tensor


class LlamaPromptEncoder:
    """The LLaMA text encoder of a HunyuanVideo folder with its prompt template."""

    def __init__(self, tokenizer, model, template: str = PROMPT_TEMPLATE, crop_start: int = CROP_START):
        self.tokenizer, self.model = tokenizer, model
        self.template, self.crop_start = template, crop_start

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype,
             tokenizer_cls=transformers.LlamaTokenizerFast, model_cls=transformers.LlamaModel) -> LlamaPromptEncoder:
        return cls(tokenizer_cls.from_pretrained(str(tokenizer_folder)),
                   load_pretrained(model_cls, folder, device, dtype))

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_sequence_length: int = 256) -> LlamaText:
        texts = [self.template.format(p) for p in prompts]
        max_length = max_sequence_length + self.crop_start
        tokens = self.tokenizer(texts, max_length=max_length, padding="max_length", truncation=True,
                                return_tensors="pt", return_attention_mask=True)
        if int(tokens.attention_mask.sum(dim=1).max()) == max_length:
            full = self.tokenizer(texts, padding="longest", return_tensors="pt").input_ids
            if full.shape[1] > max_length:
                log.warning("LLaMA: prompt truncated to %d tokens", max_sequence_length)
        ids, mask = tokens.input_ids.to(self.model.device), tokens.attention_mask.to(self.model.device)
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = out.hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)].to(self.model.dtype)
        return LlamaText(states[:, self.crop_start:], mask[:, self.crop_start:])
