"""Build tiny, randomly initialised Stable Diffusion 3 / 3.5 checkpoints in diffusers format, offline.

The folder (``model_index.json``, ``scheduler/``, ``text_encoder{,_2,_3}/``, ``tokenizer{,_2,_3}/``,
``vae/``, ``transformer/``) loads in ``diffusers.StableDiffusion3Pipeline.from_pretrained``.
Variants:

* ``sd3``: SD3-Medium-like MMDiT, no QK norm, no dual attention;
* ``sd35m``: SD3.5-Medium-like MMDiT-X: dual attention in the first blocks, QK RMSNorm;
* ``sd35l``: SD3.5-Large-like: QK RMSNorm, no dual attention;
* ``no_t5``: as ``sd3`` with ``text_encoder_3`` / ``tokenizer_3`` null (diffusers fills zeros).

Shapes: CLIP-L 16 wide, CLIP-G 24 wide (pooled 16 + 24 = 40), T5 48 wide = ``joint_attention_dim``,
so the CLIP features are zero-padded as in the real 768 + 1280 -> 4096 case. VAE: 8x spatial,
16 latent channels with SD3's shift and scale; 2x2 patches, so sizes are multiples of 16 and a
64x64 image is 16 image tokens. The learned position table is 8x8 patches (up to 128 px), so a
smaller grid is a centre crop of it. Attention is made sharp (weights N(0, 0.2), QK-norm gains about
3, varied norm weights) so that a wrong text layer, pooled vector or padding moves pixels far more
than 1/255 (tests/parity/test_sd3_pipeline.py checks that mistakes show).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from .tokenizers import CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, clip_vocab, save_clip_tokenizer, save_t5_tokenizer

logger = logging.getLogger(__name__)

SEED = 0
VARIANTS = ("sd3", "sd35m", "sd35l", "no_t5")
CLIP_L_DIM, CLIP_G_DIM, T5_DIM = 16, 24, 48
HEADS, HEAD_DIM = 2, 16  # width 32

# SD3-Medium's and SD3.5's scheduler as their folders ship it
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=HEAD_DIM,
                   num_attention_heads=HEADS, joint_attention_dim=T5_DIM, caption_projection_dim=HEADS * HEAD_DIM,
                   pooled_projection_dim=CLIP_L_DIM + CLIP_G_DIM, out_channels=16, pos_embed_max_size=8)
VARIANT_TRANSFORMER = {
    "sd3": {}, "no_t5": {},
    "sd35m": dict(dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "sd35l": dict(qk_norm="rms_norm"),
}

VAE = dict(in_channels=3, out_channels=3,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(8, 8, 16, 16), layers_per_block=1, act_fn="silu", latent_channels=16,
           norm_num_groups=4, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def _clip(vocab_size: int, width: int, seed: int, pad_id: int) -> CLIPTextModelWithProjection:
    vocab = clip_vocab()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=37, projection_dim=width,
                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                            hidden_act="quick_gelu", bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS],
                            pad_token_id=pad_id)
    torch.manual_seed(SEED + seed)
    model = CLIPTextModelWithProjection(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "layer_norm" in name:
                p.normal_(0, 0.3)
    return model


def _t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(SEED + 3)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _vae() -> AutoencoderKL:
    torch.manual_seed(SEED + 4)
    return AutoencoderKL(**VAE).eval()


def _transformer(variant: str) -> SD3Transformer2DModel:
    torch.manual_seed(SEED + 5)
    model = SD3Transformer2DModel(**TRANSFORMER, **VARIANT_TRANSFORMER[variant]).eval()
    gen = torch.Generator("cpu").manual_seed(SEED + 6)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name and name.endswith("weight") and "linear" not in name:
                p.copy_(3.0 * (1 + 0.3 * noise))  # QK RMSNorm gains: sharp, varied attention
            else:
                p.copy_(0.2 * noise)
    return model


def _tidy_model_index(path: Path, with_t5: bool) -> None:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"] if with_t5 else [None, None]
    if not with_t5:
        index["text_encoder_3"] = [None, None]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _clip_g_pads_with_bang(folder: Path) -> None:
    """SD3's CLIP-G tokenizer pads with "!" (id 0), not with the end token as CLIP-L does."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["pad_token"] = "!"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_sd3(path: str | Path, *, variant: str = "sd3") -> Path:
    """Write a tiny SD3-family pipeline folder to ``path`` (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny SD3 variant {variant!r}; one of {VARIANTS}")
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    with_t5 = variant != "no_t5"

    vocab_size = save_clip_tokenizer(path / "tokenizer")
    save_clip_tokenizer(path / "tokenizer_2")
    _clip_g_pads_with_bang(path / "tokenizer_2")
    t5_vocab = save_t5_tokenizer(path / "tokenizer_3") if with_t5 else 0
    eos = clip_vocab()[CLIP_EOS]

    pipe = StableDiffusion3Pipeline(
        transformer=_transformer(variant),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=_vae(),
        text_encoder=_clip(vocab_size, CLIP_L_DIM, 1, pad_id=eos),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder_2=_clip(vocab_size, CLIP_G_DIM, 2, pad_id=clip_vocab()["!"]),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        text_encoder_3=_t5(t5_vocab) if with_t5 else None,
        tokenizer_3=T5TokenizerFast.from_pretrained(path / "tokenizer_3") if with_t5 else None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    # save_pretrained rewrote the tokenizer folders the transformers-5 way; put back our own files
    save_clip_tokenizer(path / "tokenizer")
    save_clip_tokenizer(path / "tokenizer_2")
    _clip_g_pads_with_bang(path / "tokenizer_2")
    if with_t5:
        save_t5_tokenizer(path / "tokenizer_3")
    else:
        shutil.rmtree(path / "text_encoder_3", ignore_errors=True)
        shutil.rmtree(path / "tokenizer_3", ignore_errors=True)
    _tidy_model_index(path, with_t5)
    logger.info("built tiny SD3 (%s) at %s", variant, path)
    return path
