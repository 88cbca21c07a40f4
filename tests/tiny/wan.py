"""Tiny, randomly initialised Wan 2.1 / 2.2 checkpoints in diffusers format, built offline.

`build_tiny_wan(path, variant)` writes a folder that `diffusers.WanPipeline` (or
`WanImageToVideoPipeline`) loads:

* "t2v"       Wan 2.1 text-to-video: UMT5, 16x-channel-free tiny Wan VAE (8x spatial), one transformer;
* "i2v"       Wan 2.1 image-to-video: + CLIP vision image encoder and processor, image tokens in
              cross-attention, latent condition (mask + first frame) concatenated to the input;
* "a14b"      Wan 2.2 T2V-A14B style: `transformer` + `transformer_2`, `boundary_ratio`;
* "i2v_a14b"  Wan 2.2 I2V-A14B style: two experts, latent condition, no image encoder;
* "ti2v"      Wan 2.2 TI2V-5B style: `expand_timesteps`, residual VAE with patch 2 (16x spatial).

Attention is made sharp (q/k norm gains x3, varied norm weights) so that a wrong prompt, timestep,
expert or rotary axis moves pixels far more than 1/255. Every random init is seeded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, T5TokenizerFast, UMT5Config,
                          UMT5EncoderModel)

from .tokenizers import save_t5_tokenizer

SEED = 0
TEXT_DIM = 32
Z_21, Z_22 = 4, 8  # latent channels of the tiny 2.1 and 2.2 VAEs
VARIANTS = ("t2v", "i2v", "a14b", "i2v_a14b", "ti2v")
# Wan 2.1's scheduler as its folders ship it (flow_shift 3.0 for 480p; 5.0 for 720p)
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
    torch.manual_seed(SEED + 2)
    z = Z_22 if wan22 else Z_21
    stats = dict(latents_mean=[0.1 * i - 0.2 for i in range(z)], latents_std=[1.0 + 0.2 * i for i in range(z)])
    if wan22:
        return AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                                out_channels=12, patch_size=2, scale_factor_spatial=16, **stats).eval()
    return AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **stats).eval()


def _transformer(in_channels: int, out_channels: int, image: bool, seed: int) -> WanTransformer3DModel:
    torch.manual_seed(SEED + seed)
    extra = dict(image_dim=TEXT_DIM, added_kv_proj_dim=TEXT_DIM) if image else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                  in_channels=in_channels, out_channels=out_channels, text_dim=TEXT_DIM,
                                  freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                                  rope_max_seq_len=64, **extra).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(3.0 * (1 + 0.3 * torch.randn_like(p)))  # sharp, varied attention
            else:
                p.normal_(0, 0.2)
    return model


def _clip_vision(path: Path) -> None:
    config = CLIPVisionConfig(hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=TEXT_DIM)
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
    in_channels = 2 * z + 4 if i2v else z  # + 4 mask channels and the condition latents
    _transformer(in_channels, z, variant == "i2v", seed=3).save_pretrained(path / "transformer")
    experts = variant in ("a14b", "i2v_a14b")
    if experts:
        _transformer(in_channels, z, False, seed=4).save_pretrained(path / "transformer_2")
    if variant == "i2v":
        _clip_vision(path)
    cls = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    index = {
        "_class_name": cls, "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", type(scheduler).__name__], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if experts else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "boundary_ratio": 0.6 if experts else None, "expand_timesteps": wan22,
    }
    if i2v:
        index["image_encoder"] = ["transformers", "CLIPVisionModel"] if variant == "i2v" else [None, None]
        index["image_processor"] = ["transformers", "CLIPImageProcessor"] if variant == "i2v" else [None, None]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    assert T5TokenizerFast.from_pretrained(str(path / "tokenizer"))  # loads as the pipelines load it
    return path
