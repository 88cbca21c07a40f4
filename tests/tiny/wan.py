"""Tiny, randomly initialised Wan 2.1 / 2.2 checkpoints in diffusers format, built offline.

`build_tiny_wan(path, variant)` writes a folder that `diffusers.WanPipeline` (or
`WanImageToVideoPipeline`) loads, shaped like a real checkpoint:

* "t2v"       Wan2.1-T2V: UMT5, Wan 2.1 VAE (8x spatial), one transformer;
* "i2v"       Wan2.1-I2V-14B: + CLIP vision `image_encoder` and `image_processor`, image tokens in the
              cross-attention (`image_dim`, `added_kv_proj_dim`), mask + condition latents
              concatenated to the input channels (in = 2z + 4);
* "a14b"      Wan2.2-T2V-A14B: `transformer` + `transformer_2`, `boundary_ratio` 0.875;
* "i2v_a14b"  Wan2.2-I2V-A14B: two experts (boundary 0.9), concatenated condition, no image encoder;
* "ti2v"      Wan2.2-TI2V-5B: `expand_timesteps` (per-token timesteps), the Wan 2.2 VAE (residual,
              2x2 pixel patch: 16x spatial, 12 pixel channels).

The widths differ on purpose (UMT5 24, CLIP 40, DiT 32) so that text and image states cannot be
swapped silently. Attention is made sharp (q/k norm gains about 3, varied norm weights) so that a
wrong prompt, timestep, expert or rotary axis moves pixels far more than 1/255. Every random init is
seeded; a folder builds in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from .tokenizers import save_t5_tokenizer

SEED = 0
TEXT_DIM, IMAGE_DIM = 24, 40  # UMT5 d_model, CLIP vision hidden size
HEADS, HEAD_DIM = 2, 16  # DiT width 32; rotary axes (8, 4, 4)
Z_21, Z_22 = 4, 8  # latent channels of the tiny 2.1 and 2.2 VAEs (real: 16, 48)
VARIANTS = ("t2v", "i2v", "a14b", "i2v_a14b", "ti2v")
BOUNDARY = {"a14b": 0.875, "i2v_a14b": 0.9}  # the real A14B folders' boundary ratios
# Wan's scheduler as its folders ship it (flow_shift 3.0 for 480p; 5.0 for 720p)
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                 num_train_timesteps=1000, solver_order=2)


def _umt5(vocab_size: int) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0)
    torch.manual_seed(SEED + 1)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _vae(wan22: bool) -> AutoencoderKLWan:
    """Wan 2.1 VAE (8x spatial) or, shrunk from Wan2.2-TI2V-5B's, the residual VAE with a 2x2 pixel
    patch (16x spatial) and its own decoder width."""
    torch.manual_seed(SEED + 2)
    z = Z_22 if wan22 else Z_21
    common = dict(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0,
                  latents_mean=[0.1 * i - 0.2 for i in range(z)], latents_std=[1.0 + 0.2 * i for i in range(z)])
    if wan22:
        return AutoencoderKLWan(decoder_base_dim=16, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                                scale_factor_temporal=4, scale_factor_spatial=16, **common).eval()
    return AutoencoderKLWan(scale_factor_temporal=4, scale_factor_spatial=8, **common).eval()


def _transformer(in_channels: int, out_channels: int, image: bool, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(SEED + seed)
    dim = HEADS * HEAD_DIM
    extra = dict(image_dim=IMAGE_DIM, added_kv_proj_dim=dim) if image else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                  in_channels=in_channels, out_channels=out_channels, text_dim=TEXT_DIM,
                                  freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64, **extra).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(3.0 * (1 + 0.3 * torch.randn_like(p)))  # sharp, varied attention and norms
            else:
                p.normal_(0, 0.2)
    return model


def _clip_vision(path: Path) -> None:
    config = CLIPVisionConfig(hidden_size=IMAGE_DIM, intermediate_size=37, num_hidden_layers=3, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=IMAGE_DIM)
    torch.manual_seed(SEED + 5)
    CLIPVisionModel(config).eval().save_pretrained(path / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path / "image_processor")


def build_tiny_wan(path: str | Path, variant: str = "t2v", scheduler=None) -> Path:
    """Write a tiny Wan folder of `variant` (see the module docstring) at `path`; `scheduler` (a
    diffusers scheduler object) replaces Wan's UniPC."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny Wan variant {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = save_t5_tokenizer(path / "tokenizer")
    _umt5(vocab).save_pretrained(path / "text_encoder")
    wan22 = variant == "ti2v"
    _vae(wan22).save_pretrained(path / "vae")
    scheduler = scheduler or UniPCMultistepScheduler(**SCHEDULER)
    scheduler.save_pretrained(path / "scheduler")
    z = Z_22 if wan22 else Z_21
    i2v = variant in ("i2v", "i2v_a14b")
    in_channels = 2 * z + 4 if i2v else z  # + 4 mask channels (one per frame of the first group) and the condition
    _transformer(in_channels, z, variant == "i2v", seed=3).save_pretrained(path / "transformer")
    experts = variant in BOUNDARY
    if experts:
        _transformer(in_channels, z, False, seed=4).save_pretrained(path / "transformer_2")
    if variant == "i2v":
        _clip_vision(path)
    none = [None, None]
    index = {
        "_class_name": "WanImageToVideoPipeline" if i2v else "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", type(scheduler).__name__], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if experts else none,
        "vae": ["diffusers", "AutoencoderKLWan"],
        "boundary_ratio": BOUNDARY.get(variant), "expand_timesteps": wan22,
    }
    if i2v:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"] if variant == "i2v" else none
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if variant == "i2v" else none
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    assert T5TokenizerFast.from_pretrained(str(path / "tokenizer"))  # loads as the pipelines load it
    return path
