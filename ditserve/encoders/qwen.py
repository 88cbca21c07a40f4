"""Qwen2.5-VL prompt encoding for Qwen-Image: the prompt in the family's chat template, the
language model's last hidden states, the template's system part dropped from the front.

For editing, the input images go through the Qwen2-VL image processor and the vision tower: each
`<|image_pad|>` in the template becomes one token per merged patch group, as `Qwen2VLProcessor`
expands it. We compose the processor from its image processor and tokenizer rather than load
`Qwen2VLProcessor` itself, which transformers 5 builds only together with a video processor
(needing torchvision) that image editing never uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image

from ditserve.encoders.text import load_pretrained

log = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VISION_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
_SYSTEM_EDIT = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                "then explain how the user's text instruction should alter or modify the image. Generate a new "
                "image that meets the user's requirements while maintaining consistency with the original input "
                "where appropriate.")


@dataclass(frozen=True)
class PromptTemplate:
    """A chat template around the prompt. The first `drop` tokens (the system part, in the real
    tokenizer) are cut from the hidden states. `image_slot` is written before the prompt once per
    input image (numbered from 1). `max_tokens` truncates the tokenised text at `max_tokens + drop`
    (text-to-image only; the edit pipelines do not truncate)."""

    text: str
    drop: int
    image_slot: str = ""
    max_tokens: int | None = None

    def format(self, prompt: str, num_images: int = 0) -> str:
        slots = "".join(self.image_slot.format(i + 1) for i in range(num_images))
        return self.text.format(slots + prompt)


T2I_TEMPLATE = PromptTemplate(
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n", drop=34, max_tokens=1024)
EDIT_TEMPLATE = PromptTemplate(
    f"<|im_start|>system\n{_SYSTEM_EDIT}<|im_end|>\n<|im_start|>user\n{VISION_SLOT}{{}}<|im_end|>\n"
    "<|im_start|>assistant\n", drop=64)
EDIT_PLUS_TEMPLATE = PromptTemplate(
    f"<|im_start|>system\n{_SYSTEM_EDIT}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n",
    drop=64, image_slot=f"Picture {{}}: {VISION_SLOT}")


# Qwen-Image-Layered's captioning prompts (diffusers writes a caption when the prompt is empty),
# line by line as the pipeline has them; one image slot each
_CAPTION_HEAD = ("<|im_start|>system", "You are a helpful assistant.<|im_end|>", "<|im_start|>user")
_CAPTION_TAIL = (f"{VISION_SLOT}<|im_end|>", "<|im_start|>assistant", "")
CAPTION_PROMPTS = {
    "en": "\n".join((*_CAPTION_HEAD, "# Image Annotator", "You are a professional",
                     "image annotator. Please write an image caption based on the input image:",
                     "1. Write the caption using natural,",
                     "descriptive language without structured formats or rich text.",
                     "2. Enrich caption details by including: ", " - Object",
                     "attributes, such as quantity, color, shape, size, material, state, position, actions, and so on",
                     " - Vision Relations",
                     "between objects, such as spatial relations, functional relations, possessive relations, "
                     "attachment relations, action",
                     "relations, comparative relations, causal relations, and so on",
                     " - Environmental details, such as weather, lighting,", "colors, textures, atmosphere, and so on",
                     " - Identify the text clearly visible in the image, without translation or",
                     "explanation, and highlight it in the caption with quotation marks",
                     "3. Maintain authenticity and accuracy:", " - Avoid", "generalizations",
                     " - Describe all visible information in the image, while do not add information not explicitly "
                     "shown in", "the image", *_CAPTION_TAIL)),
    "zh": "\n".join((*_CAPTION_HEAD, "# 图像标注器", "你是一个专业的图像标注器。请基于输入图像，撰写图注:", "1.",
                     "使用自然、描述性的语言撰写图注，不要使用结构化形式或富文本形式。", "2. 通过加入以下内容，丰富图注细节：",
                     " - 对象的属性：如数量、颜色、形状、大小、位置、材质、状态、动作等", " -",
                     "对象间的视觉关系：如空间关系、功能关系、动作关系、从属关系、比较关系、因果关系等",
                     " - 环境细节：例如天气、光照、颜色、纹理、气氛等",
                     " - 文字内容：识别图像中清晰可见的文字，不做翻译和解释，用引号在图注中强调", "3.", "保持真实性与准确性：",
                     " - 不要使用笼统的描述", " -", "描述图像中所有可见的信息，但不要加入没有在图像中出现的内容",
                     *_CAPTION_TAIL)),
}
MAX_CAPTION_TOKENS = 512


@dataclass
class PromptEmbeds:
    """Hidden states [N, T, D], zero past each prompt's length; mask [N, T] (True = token)."""

    txt: torch.Tensor
    mask: torch.Tensor


def _text_only(model) -> None:
    """Text-to-image reads only the language model's hidden states: the vision tower and the LM head
    (0.68 B and 0.55 B of Qwen2.5-VL-7B's 8.3 B parameters) go before the model reaches the device."""
    if not hasattr(model.model, "language_model"):  # transformers < 4.52 lays the model out otherwise: kept whole
        return
    model.model.visual = None
    model.lm_head = None


class QwenPromptEncoder:
    """Qwen2.5-VL (text and, for editing, vision) as Qwen-Image's prompt encoder."""

    def __init__(self, tokenizer, model, image_processor=None):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor

    @classmethod
    def load(cls, folder: Path, tokenizer_folder: Path, device, dtype: torch.dtype,
             processor_folder: Path | None = None, text_only: bool = False) -> "QwenPromptEncoder":
        """`processor_folder` (edit models) holds the image processor config and its tokenizer; `text_only`:
        the model only ever reads prompts (no images in them, no captions), so its vision tower and LM head
        are dropped."""
        image_processor = None
        if processor_folder is not None:
            image_processor = transformers.AutoImageProcessor.from_pretrained(str(processor_folder))
            tokenizer_folder = processor_folder
        tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(tokenizer_folder))
        model = load_pretrained(transformers.Qwen2_5_VLForConditionalGeneration, folder, device, dtype,
                                prune=_text_only if text_only else None)
        return cls(tokenizer, model, image_processor)

    @torch.no_grad()
    def __call__(self, prompts: list[str], template: PromptTemplate,
                 images: list[list[Image.Image]] | None = None) -> PromptEmbeds:
        """Encode each prompt (with its own input images when given), zero-padded to the longest."""
        if images is None:
            texts = [template.format(p) for p in prompts]
            max_length = None if template.max_tokens is None else template.max_tokens + template.drop
            tokens = self.tokenizer(texts, max_length=max_length, padding=True, truncation=max_length is not None,
                                    return_tensors="pt")
            hidden = self._hidden(tokens.input_ids, tokens.attention_mask)
            per_prompt = _valid_after(hidden, tokens.attention_mask, template.drop)
        else:
            per_prompt = []
            for prompt, imgs in zip(prompts, images, strict=True):
                ids, mask, vision = self._tokens_with_images(template.format(prompt, len(imgs)), imgs)
                per_prompt += _valid_after(self._hidden(ids, mask, **vision), mask, template.drop)
        return _pad(per_prompt)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, **vision) -> torch.Tensor:
        device = self.model.device
        vision = {k: v.to(device) for k, v in vision.items()}
        # exactly as the diffusers pipelines call it (e.g. no mm_token_type_ids: in transformers 5
        # that means 1-D text positions), so the hidden states match across transformers versions
        # without its LM head (text-to-image) the model's inner part gives the same hidden states
        run = self.model if self.model.lm_head is not None else self.model.model
        out = run(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                  use_cache=False, **vision)
        return out.hidden_states[-1]

    @torch.no_grad()
    def caption(self, image: Image.Image, prompt: str, seed: int, max_new_tokens: int = MAX_CAPTION_TOKENS) -> str:
        """What Qwen2.5-VL writes about `image` for a captioning `prompt` (one image slot), as
        diffusers' Qwen-Image-Layered asks it through Qwen2VLProcessor: the image as given (the image
        processor puts any transparency on white), the folder's generation config. Should that config
        sample, it draws from a generator seeded with `seed` (the same caption on every rank)."""
        ids, mask, vision = self._tokens_with_images(prompt, [image], rgb=False)
        image_token = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        device = self.model.device
        inputs = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_token).long(), **vision}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens)
        text = self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True,
                                           clean_up_tokenization_spaces=False)[0]
        return text.strip()

    def _tokens_with_images(self, text: str, images: list[Image.Image], rgb: bool = True):
        """Qwen2VLProcessor's expansion: each image slot gets one pad token per merged patch group.
        `rgb`: images converted to RGB first (as the edit pipelines hand them over)."""
        if self.image_processor is None:
            raise ValueError("this model has no image processor (processor/ folder); it cannot read images")
        images = [im.convert("RGB") for im in images] if rgb else images
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = vision["image_grid_thw"]
        parts = text.split(IMAGE_PAD)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"template has {len(parts) - 1} image slots for {len(grids)} images")
        merge = self.image_processor.merge_size**2
        expanded = parts[0] + "".join(IMAGE_PAD * int(g.prod() // merge) + part for g, part in zip(grids, parts[1:]))
        tokens = self.tokenizer([expanded], padding=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask, {"pixel_values": vision["pixel_values"],
                                                        "image_grid_thw": grids}


def _valid_after(hidden: torch.Tensor, mask: torch.Tensor, drop: int) -> list[torch.Tensor]:
    """Each row's unpadded hidden states, minus the first `drop` (the template's system part)."""
    mask = mask.to(hidden.device).bool()
    return [row[m][drop:] for row, m in zip(hidden, mask)]


def _pad(rows: list[torch.Tensor]) -> PromptEmbeds:
    longest = max(r.shape[0] for r in rows)
    txt = torch.stack([torch.cat([r, r.new_zeros(longest - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack([torch.arange(longest, device=txt.device) < r.shape[0] for r in rows])
    return PromptEmbeds(txt, mask)
