"""Tiny, randomly initialised CogVideoX checkpoints in diffusers format, built offline.

`build_tiny_cogvideox(path, variant)` writes a folder that `diffusers.CogVideoXPipeline` (or
`CogVideoXImageToVideoPipeline`) loads, shaped like a real checkpoint (T5 padded to 226 tokens, the
CogVideoX VAE: 8x spatial, 4x temporal):

* "2b"        CogVideoX-2B: sin-cos positions, DDIM (snr_shift_scale 3.0);
* "5b"        CogVideoX-5B: 3D rotary positions cropped to the trained grid, DPM (snr_shift_scale 1.0);
* "5b_dynamic" as "5b" with `ditserve.json` turning on dynamic CFG by default (`use_dynamic_cfg`);
* "1.5"       CogVideoX1.5-5B: patches two latent frames deep, sliced rotary grid, DDIM;
* "i2v"       CogVideoX-5B-I2V: image latents concatenated on channels (in = 2z), learned + rotary
              positions (so the trained size only), DDIM.
* "1.5_i2v"   CogVideoX1.5-5B-I2V: temporal patches, the "ofs" embedding, `invert_scale_latents`, DPM.

The DiT's trained sample is 4x6 latents (32x48 pixels) and 9 frames. Attention is sharp (norm gains
about 3, varied) so that a wrong prompt, position or schedule moves pixels far more than 1/255.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXTransformer3DModel,
)
from transformers import T5Config, T5EncoderModel

from .tokenizers import save_t5_tokenizer

SEED = 0
TEXT_DIM, Z = 20, 4  # T5 d_model, latent channels (real: 4096, 16)
VARIANTS = ("2b", "5b", "5b_dynamic", "1.5", "i2v", "1.5_i2v")
# the CogVideoX folders' scheduler config (2B: snr_shift_scale 3.0; 5B and 1.5: 1.0)
SCHEDULER = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                 set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing")


def _t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=24, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(SEED + 1)
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def _vae(invert: bool = False) -> AutoencoderKLCogVideoX:
    """`invert`: the 1.5-I2V VAE's `invert_scale_latents` (image latents divided by the scaling factor)."""
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 16, 16), latent_channels=Z, layers_per_block=1,
                                 norm_num_groups=4, temporal_compression_ratio=4, sample_height=32, sample_width=48,
                                 scaling_factor=0.7, invert_scale_latents=invert).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        conv_out = vae.decoder.conv_out.conv
        conv_out.weight.mul_(0.3)  # frames mostly inside [-1, 1]: few clamped pixels to hide a mistake
        conv_out.bias.mul_(0.3)
    return vae


def _transformer(variant: str) -> CogVideoXTransformer3DModel:
    torch.manual_seed(SEED + 3)
    i2v = variant.endswith("i2v")
    extra = {}
    if variant != "2b":
        extra["use_rotary_positional_embeddings"] = True
    if variant.startswith("1.5"):
        extra["patch_size_t"] = 2
    if variant == "i2v":
        extra["use_learned_positional_embeddings"] = True
    if variant == "1.5_i2v":
        extra["ofs_embed_dim"] = 24
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2 * Z if i2v else Z,
                                        out_channels=Z, time_embed_dim=24, text_embed_dim=TEXT_DIM, num_layers=2,
                                        sample_width=6, sample_height=4, sample_frames=9, patch_size=2,
                                        max_text_seq_length=226, **extra).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(3.0 * (1 + 0.3 * torch.randn_like(p)))  # sharp, varied attention and norms
            else:
                p.normal_(0, 0.2)
        model.proj_out.weight.mul_(0.03)  # v-predictions of about unit size: latents stay in the VAE's range
    return model


def build_tiny_cogvideox(path: str | Path, variant: str = "2b") -> Path:
    """Write a tiny CogVideoX folder of `variant` (see the module docstring) at `path`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny CogVideoX variant {variant!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _t5(save_t5_tokenizer(path / "tokenizer")).save_pretrained(path / "text_encoder")
    _vae(invert=variant == "1.5_i2v").save_pretrained(path / "vae")
    dpm = variant in ("5b", "5b_dynamic", "1.5_i2v")
    scheduler_cls = CogVideoXDPMScheduler if dpm else CogVideoXDDIMScheduler
    scheduler_cls(**dict(SCHEDULER, snr_shift_scale=3.0 if variant == "2b" else 1.0)).save_pretrained(
        path / "scheduler")
    _transformer(variant.replace("_dynamic", "")).save_pretrained(path / "transformer")
    if variant == "5b_dynamic":
        (path / "ditserve.json").write_text(json.dumps({"defaults": {"use_dynamic_cfg": True}}))
    index = {
        "_class_name": "CogVideoXImageToVideoPipeline" if variant.endswith("i2v") else "CogVideoXPipeline",
        "_diffusers_version": "0.42.1", "scheduler": ["diffusers", scheduler_cls.__name__],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
