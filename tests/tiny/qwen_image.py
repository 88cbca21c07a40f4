"""Build tiny, randomly initialised Qwen-Image / Qwen-Image-Edit checkpoints in diffusers format, offline.

The folder holds ``model_index.json`` plus ``scheduler/``, ``text_encoder/`` (a tiny
Qwen2.5-VL with a vision tower), ``tokenizer/``, ``vae/``, ``transformer/`` and, for the edit
pipelines, ``processor/``. ``diffusers.QwenImagePipeline.from_pretrained`` loads the text-to-image
folder as is; the edit folders load with ``processor=reference_processor(path)`` (transformers 5
builds ``Qwen2VLProcessor`` only with a video processor, which needs torchvision).

Shapes that matter to code under test:

* tokenizer: byte-level BPE with no merges (ids 0-255 are the bytes) plus the Qwen specials at
  256.. (``<|endoftext|>`` = pad, ``<|im_start|>``, ``<|im_end|>``, the vision tokens). The
  pipelines drop 34 (text-to-image) or 64 (edit) template tokens from the front, as for the
  real tokenizer, so a few hundred byte tokens remain per prompt.
* processor: Qwen2-VL image processor with at most 112x112 pixels -> <= 16 image tokens.
* VAE: 3 spatial downsamples (x8), 4 latent channels with non-trivial latents mean/std;
  transformer: patch 2 -> 16 packed channels, 2 layers, 2 heads x 16, RoPE axes (4, 6, 6),
  text dim 32; its weights are redrawn from N(0, 0.2) so images are far from flat.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from transformers import AddedToken, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .tokenizers import bytes_to_unicode

logger = logging.getLogger(__name__)

SEED = 0
TRANSFORMER_INIT_STD = 0.2
QK_GAIN = 20.0  # the layered folder's q/k norm weights are scaled up by this much
TEXT_DIM = 32
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")
MAX_PIXELS = 112 * 112

# Qwen-Image's scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                 time_shift_type="exponential")
VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], latents_mean=[0.3, -0.5, 0.1, 0.8],
           latents_std=[1.6, 0.7, 2.2, 1.1])
TRANSFORMER = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
CLASS_NAMES = {"t2i": "QwenImagePipeline", "edit": "QwenImageEditPipeline",
               "edit_plus": "QwenImageEditPlusPipeline", "edit_2511": "QwenImageEditPlusPipeline",
               "layered": "QwenImageLayeredPipeline"}
# transformer config keys that make a variant (Qwen-Image-Edit-2511: per-token modulation;
# Qwen-Image-Layered: the additional timestep embedding and layered 3D RoPE, with an RGBA VAE)
VARIANT_FLAGS = {"edit_2511": {"zero_cond_t": True},
                 "layered": {"use_additional_t_cond": True, "use_layer3d_rope": True, "in_channels": 32,
                             "out_channels": 8}}
# Layered's VAE reads RGBA; 8 latent channels, since diffusers takes a 4-channel input for latents
# when the VAE has 4 (the real one has 16)
LAYERED_VAE = dict(VAE, z_dim=8, input_channels=4, latents_mean=[0.3, -0.5, 0.1, 0.8, -0.2, 0.4, 0.0, -0.7],
                   latents_std=[1.6, 0.7, 2.2, 1.1, 0.9, 1.3, 0.8, 1.9])


def special_id(token: str) -> int:
    return 256 + SPECIALS.index(token)


def save_qwen_tokenizer(path: Path) -> int:
    """A byte-level Qwen2Tokenizer (every byte one token) with the Qwen specials; returns its size."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab |= {tok: special_id(tok) for tok in SPECIALS}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIALS]})
    tok.save_pretrained(path)
    ids = Qwen2Tokenizer.from_pretrained(path).convert_tokens_to_ids(list(SPECIALS))
    if ids != [special_id(t) for t in SPECIALS] or len(tok) != 256 + len(SPECIALS):
        raise RuntimeError(f"tiny Qwen2 tokenizer came out wrong: specials {ids}, size {len(tok)}")
    return len(tok)


def save_qwen_processor(path: Path) -> None:
    """The processor folder as the real repos have it: tokenizer files + the image processor config."""
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    save_qwen_tokenizer(path)
    Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": MAX_PIXELS}).save_pretrained(path)


def reference_processor(path: str | Path):
    """diffusers' reference needs a real `Qwen2VLProcessor`; build it without a video processor."""
    from unittest import mock

    from transformers import AutoImageProcessor, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    folder = Path(path) / "processor"
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if arg is None else check(self, name, arg)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lenient):
        return Qwen2VLProcessor(image_processor=AutoImageProcessor.from_pretrained(folder),
                                tokenizer=Qwen2Tokenizer.from_pretrained(folder), video_processor=None)


def _text_encoder(vocab_size: int) -> Qwen2_5_VLForConditionalGeneration:
    text = dict(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=special_id("<|endoftext|>"), eos_token_id=special_id("<|im_end|>"),
                pad_token_id=special_id("<|endoftext|>"))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_DIM,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              image_token_id=special_id("<|image_pad|>"),
                              video_token_id=special_id("<|video_pad|>"),
                              vision_start_token_id=special_id("<|vision_start|>"),
                              vision_end_token_id=special_id("<|vision_end|>"))
    torch.manual_seed(SEED + 1)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _transformer(kind: str) -> QwenImageTransformer2DModel:
    torch.manual_seed(SEED + 2)
    model = QwenImageTransformer2DModel(**(TRANSFORMER | VARIANT_FLAGS.get(kind, {}))).eval()
    gen = torch.Generator("cpu").manual_seed(SEED + 3)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * TRANSFORMER_INIT_STD)
            if kind == "layered" and ".norm_" in name:  # sharp attention: positions and the input image matter
                param.mul_(QK_GAIN)
    return model


def _vae(kind: str) -> AutoencoderKLQwenImage:
    torch.manual_seed(SEED + 4)
    return AutoencoderKLQwenImage(**(LAYERED_VAE if kind == "layered" else VAE)).eval()


def _model_index(kind: str) -> dict:
    index = {
        "_class_name": CLASS_NAMES[kind],
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if kind != "t2i":
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    return index


def build_tiny_qwen_image(path: str | Path, *, kind: str = "t2i") -> Path:
    """Write a tiny Qwen-Image folder to ``path``: ``kind`` is "t2i", "edit", "edit_plus",
    "edit_2511" (Edit Plus with ``zero_cond_t``) or "layered" (Qwen-Image-Layered: RGBA VAE)."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    vocab_size = save_qwen_tokenizer(path / "tokenizer")
    if kind != "t2i":
        save_qwen_processor(path / "processor")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(path / "scheduler")
    _text_encoder(vocab_size).save_pretrained(path / "text_encoder")
    _vae(kind).save_pretrained(path / "vae")
    _transformer(kind).save_pretrained(path / "transformer")
    (path / "model_index.json").write_text(json.dumps(_model_index(kind), indent=2) + "\n")
    logger.info("built tiny Qwen-Image (%s) at %s", kind, path)
    return path
