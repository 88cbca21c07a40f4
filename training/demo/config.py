"""Architecture and training settings of the demo model. Presets are data; change them here only.

The model is FLUX.1-schnell-shaped (no guidance embedding, static shift 1.0) and small: the shipped
weights took about 5.5 minutes on one H200 (recipe "gpu"); the CPU recipe "full" runs at about 1 VAE
step/s and 2.5 DiT steps/s on one busy core, about 4 hours in all, resumable:

* VAE: ``AutoencoderKL``, 4 blocks -> 8x downsampling, 16 latent channels (as FLUX): a 64x64
  image is an 8x8x16 latent, packed 2x2 into 16 tokens of 64 channels;
* DiT: ``FluxTransformer2DModel``, 3 double + 3 single blocks, 4 heads x 32 = 128 wide;
* text: a 2-layer T5 encoder (128 wide, word-level Unigram vocab over the caption words and
  every single character) and a 2-layer CLIP text model (64 wide, byte-level BPE whose merges
  make each caption word one token), both trained together with the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ditserve.bench.tokenizers import CLIP_MAX_LENGTH
from training.common_cli import overridden

from .scenes import CAPTION_WORDS, IMAGE_SIZE

SEED = 0
NUM_HELD_OUT = 48  # (color, shape, position, background) combos never shown in training
MAX_SEQUENCE_LENGTH = 16  # T5 tokens; the longest caption needs 10
T5_DIM, CLIP_DIM = 128, 64
LATENT_CHANNELS = 16

VAE = dict(in_channels=3, out_channels=3,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           block_out_channels=(16, 32, 64, 64), layers_per_block=1, act_fn="silu",
           latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=IMAGE_SIZE,
           use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)

TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=3, num_single_layers=3,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=T5_DIM,
                   pooled_projection_dim=CLIP_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))

T5 = dict(d_model=T5_DIM, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
          relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

CLIP = dict(hidden_size=CLIP_DIM, intermediate_size=128, projection_dim=CLIP_DIM, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu")

# FLUX.1-schnell's scheduler: static shift 1.0 (the dynamic-shift fields are unused but kept).
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

# What `ditserve generate` uses for this model unless the request says otherwise (ditserve.json).
REQUEST_DEFAULTS = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=20, guidance_scale=0.0,
                        max_sequence_length=MAX_SEQUENCE_LENGTH)

TOKENIZER_WORDS = CAPTION_WORDS + ("an",)  # "an orange circle" is trained as well


@dataclass(frozen=True)
class VaeTraining:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    kl_weight: float = 1e-6  # times the KL summed over a latent, per image
    log_every: int = 100
    ckpt_every: int = 500


@dataclass(frozen=True)
class DitTraining:
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 100
    ckpt_every: int = 1000


@dataclass(frozen=True)
class Recipe:
    seed: int = SEED
    dataset_size: int = 60_000  # training scenes, drawn once: the VAE learns them, the DiT their latents
    vae: VaeTraining = VaeTraining()
    dit: DitTraining = DitTraining()


_GPU_VAE = VaeTraining(steps=5000, batch_size=128, lr=8e-4, log_every=250, ckpt_every=1000)
_GPU_DIT = DitTraining(steps=6000, batch_size=256, lr=1e-3, warmup=700, log_every=500,
                       ckpt_every=2000)

RECIPES = {
    # Two CPU cores: a few hours with the cores to itself (resumable).
    "full": Recipe(),
    # One GPU, about 8 minutes on an H200 (training/demo/run_gpu.sh); "gpu-lowlr" is its
    # hedge, trained beside it on the same VAE and data.
    "gpu": Recipe(dataset_size=200_000, vae=_GPU_VAE, dit=_GPU_DIT),
    "gpu-lowlr": Recipe(dataset_size=200_000, vae=_GPU_VAE, dit=replace(_GPU_DIT, lr=5e-4)),
    # Seconds: the whole chain at toy size, for tests and for trying changes; draws nothing useful.
    "smoke": Recipe(dataset_size=64, vae=VaeTraining(steps=6, batch_size=4, warmup=2, log_every=2, ckpt_every=3),
                    dit=DitTraining(steps=6, batch_size=8, warmup=2, log_every=2, ckpt_every=3)),
}


def recipe(name: str, vae_steps: int | None = None, dit_steps: int | None = None,
           dataset_size: int | None = None) -> Recipe:
    """A named recipe, with its stages' step counts or its scene count overridden where given."""
    return overridden(RECIPES[name], vae_steps, dit_steps, dataset_size)
