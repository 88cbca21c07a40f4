"""Build a tiny, randomly initialised FLUX checkpoint in diffusers format, offline.

The result is a complete folder (``model_index.json`` plus ``scheduler/``,
``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, ``vae/``
and ``transformer/``) that ``diffusers.FluxPipeline.from_pretrained`` loads. It is
about 1 MB and builds in well under a second. Every random init is seeded, so
two builds with the same arguments give byte-identical weights.

Shapes that matter to code under test:

* VAE: 4 blocks -> ``vae_scale_factor`` 8, 4 latent channels; images must be a
  multiple of 16 pixels (8x VAE, 2x2 packing), e.g. 64x64 -> 16 image tokens.
* transformer: ``in_channels`` 16 (= 4 latent channels x 2x2), 2 heads x 16 dims
  (inner 32), RoPE axes (4, 6, 6); text is 32-dim (T5) and pooled 32-dim (CLIP).
* the transformer's weights are redrawn from N(0, 0.2) so its output (and the
  decoded image) is far from flat, which makes parity tests meaningful.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5TokenizerFast)

from .tokenizers import (CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, clip_vocab, save_clip_tokenizer,
                         save_t5_tokenizer)

logger = logging.getLogger(__name__)

SEED = 0
TRANSFORMER_INIT_STD = 0.2
SHARD_SIZE = "100KB"  # -> 6 shards of the ~540 KB transformer

# FLUX.1-dev's scheduler config; schnell differs only in shift / dynamic shifting.
SCHEDULER_DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                     num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
SCHEDULER_SCHNELL = dict(SCHEDULER_DEV, shift=1.0, use_dynamic_shifting=False)

TEXT_DIM = 32  # CLIP hidden (= pooled) size and T5 d_model

TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                   axes_dims_rope=(4, 6, 6))

VAE = dict(in_channels=3, out_channels=3,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(8, 8, 16, 16), layers_per_block=1, act_fn="silu", latent_channels=4,
           norm_num_groups=4, sample_size=32, scaling_factor=1.5035, shift_factor=0.0609,
           use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)


def _clip_text_encoder(vocab_size: int) -> CLIPTextModel:
    vocab = clip_vocab()
    eos = vocab[CLIP_EOS]
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37,
                            projection_dim=TEXT_DIM, num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
                            bos_token_id=vocab[CLIP_BOS], eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(SEED + 1)
    return CLIPTextModel(config).eval()


def _t5_text_encoder(vocab_size: int) -> T5EncoderModel:
    # 2 heads x d_kv 16 = 32 = d_model; gated-gelu like T5 v1.1 (FLUX's T5-XXL).
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                      decoder_start_token_id=0)
    torch.manual_seed(SEED + 2)
    return T5EncoderModel(config).eval()


def _vae() -> AutoencoderKL:
    torch.manual_seed(SEED + 3)
    return AutoencoderKL(**VAE).eval()


def _transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    torch.manual_seed(SEED + 4)
    model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=guidance_embeds).eval()
    # diffusers' default init leaves the output nearly flat (zero-ish modulation);
    # redraw everything, biases and norm weights included, so outputs vary.
    gen = torch.Generator("cpu").manual_seed(SEED + 5)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * TRANSFORMER_INIT_STD)
    return model


def _fix_model_index(model_index: Path) -> None:
    # transformers 5 makes T5TokenizerFast an alias of T5Tokenizer, so the saved index
    # names "T5Tokenizer" -- which in transformers 4 is the slow SentencePiece class
    # needing spiece.model. Name it "T5TokenizerFast" as the real FLUX repos do.
    index = json.loads(model_index.read_text(encoding="utf-8"))
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    model_index.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_flux(path: str | Path, *, guidance_embeds: bool, sharded: bool = False) -> Path:
    """Write a tiny FLUX pipeline folder to ``path`` and return it as a Path.

    ``guidance_embeds=True`` gives a FLUX.1-dev-like model (guidance embedding,
    dynamic-shift scheduler); ``False`` a schnell-like one (no guidance, shift 1).
    ``sharded=True`` saves the transformer in several small safetensors shards
    with a ``diffusion_pytorch_model.safetensors.index.json``.
    """
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)

    clip_vocab_size = save_clip_tokenizer(path / "tokenizer")
    t5_vocab_size = save_t5_tokenizer(path / "tokenizer_2")

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(SCHEDULER_DEV if guidance_embeds else SCHEDULER_SCHNELL)),
        vae=_vae(),
        text_encoder=_clip_text_encoder(clip_vocab_size),
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder_2=_t5_text_encoder(t5_vocab_size),
        tokenizer_2=T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        transformer=_transformer(guidance_embeds),
    )
    pipe.save_pretrained(path, safe_serialization=True)

    # save_pretrained rewrote the tokenizer folders the transformers-5 way; put
    # back our own files (vocab.json/merges.txt, tidied configs). Same tokenizers.
    save_clip_tokenizer(path / "tokenizer")
    save_t5_tokenizer(path / "tokenizer_2")
    _fix_model_index(path / "model_index.json")

    if sharded:
        transformer_dir = path / "transformer"
        for f in transformer_dir.glob("diffusion_pytorch_model*.safetensors*"):
            f.unlink()
        pipe.transformer.save_pretrained(transformer_dir, safe_serialization=True, max_shard_size=SHARD_SIZE)
        index = transformer_dir / "diffusion_pytorch_model.safetensors.index.json"
        shards = sorted(transformer_dir.glob("diffusion_pytorch_model-*-of-*.safetensors"))
        if not index.is_file() or len(shards) < 2:
            raise RuntimeError(f"sharded save of the tiny transformer did not shard: {sorted(transformer_dir.iterdir())}")
        logger.debug("tiny FLUX transformer saved in %d shards", len(shards))

    logger.info("built tiny FLUX (%s%s) at %s", "dev" if guidance_embeds else "schnell",
                ", sharded" if sharded else "", path)
    return path
