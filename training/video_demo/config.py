"""Architecture and training settings of the video demo model. Presets are data; change them here only.

The model is Wan 2.1 text-to-video shaped and small (float32, about 21 MB in all):

* VAE: ``AutoencoderKLWan`` (base width 16, 4 levels, causal 3D convolutions), 8x spatial and
  4x temporal compression, 16 latent channels, as Wan 2.1: a 17x64x64 clip is a 5x8x8x16 latent;
* DiT: ``WanTransformer3DModel``, 6 blocks, 6 heads x 32 = 192 wide, patch 1x2x2 -> 80 tokens;
* text: a 2-layer ``UMT5EncoderModel`` (128 wide) with a Unigram vocabulary holding the caption
  words as whole pieces plus every single character; trained together with the DiT.

Recipes: "gpu" (one H200, about 10 minutes with ``run_gpu.sh``), "cpu" (one core, under an hour:
shows the chain learning, far from the goal) and "smoke" (the whole chain at toy size on a CPU in
well under a minute; draws nothing useful).
"""

from __future__ import annotations

from dataclasses import dataclass

from training.common_cli import overridden

from .scenes import CAPTION_WORDS, FPS, IMAGE_SIZE, NUM_FRAMES

SEED = 0
NUM_HELD_OUT = 48  # (color, shape, direction, background) combos never shown in training
MAX_SEQUENCE_LENGTH = 16  # UMT5 tokens; the longest caption needs 10 (with </s>)
TEXT_DIM = 128
LATENT_CHANNELS = 16

VAE = dict(base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True, True], dropout=0.0, scale_factor_temporal=4, scale_factor_spatial=8)

# The same VAE with one level less: 4x spatial compression (16 x 16 latents a frame; 320 DiT tokens a clip
# with the (1, 2, 2) patch). The 8x VAE's 8 x 8 latents round the 14-20 px shapes' corners (triangles keep
# their shape in 15 % of frames through it); `train --vae-spatial 4` trains this one instead.
VAE_4X = dict(VAE, dim_mult=[1, 2, 2], temperal_downsample=[True, True], scale_factor_spatial=4)
VAE_CONFIGS = {8: VAE, 4: VAE_4X}

VAE_LOGVAR_INIT = -6.0  # the posterior starts with std e^-3 ~ 0.05 (see vae.build_vae)

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=LATENT_CHANNELS,
                   out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=256, ffn_dim=768, num_layers=6,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

UMT5 = dict(d_model=TEXT_DIM, d_kv=32, d_ff=256, num_layers=2, num_heads=4, relative_attention_num_buckets=16,
            relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0)

# diffusers' Wan 2.1 scheduler (UniPC on flow sigmas) as the Wan folders ship it, with the shift of a
# small latent: Wan's 3.0 is for 480p (~32k tokens); 80 tokens need none (SD3's resolution rule), as
# the image demo's 16 tokens were trained and sampled with shift 1.
FLOW_SHIFT = 1.0
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT,
                 num_train_timesteps=1000, solver_order=2)

# What ditserve uses for this model unless the request says otherwise (ditserve.json). The DiT is trained
# with 10% empty prompts, so classifier-free guidance works: 5.0, diffusers' WanPipeline default, was the
# best of 1-7 on 48 training combos (`evaluate --seen`: facts 92.9 % against 85-86 % without CFG; README).
REQUEST_DEFAULTS = dict(height=IMAGE_SIZE, width=IMAGE_SIZE, num_frames=NUM_FRAMES, fps=FPS, num_inference_steps=20,
                        guidance_scale=5.0, max_sequence_length=MAX_SEQUENCE_LENGTH)

TOKENIZER_WORDS = CAPTION_WORDS + ("an",)  # "an orange circle" is trained as well


# The "gpu" recipe's step counts are upper bounds: run_gpu.sh gives each stage a deadline, and the
# learning rate's cosine then follows the clock (common.lr_now), ending where the stage stops.
@dataclass(frozen=True)
class VaeTraining:
    steps: int = 5000
    batch_size: int = 32
    frames: int = 9  # clip length the VAE trains on (4k + 1; the causal VAE then runs any length)
    bank_size: int = 0  # > 0: draw this many clips once (on the device) and index them; 0: fresh clips every step
    lr: float = 1e-3
    warmup: int = 200
    kl_weight: float = 1e-6  # times the KL summed over a latent, per clip
    fg_weight: float = 0.0  # the shape's pixels weigh 1 + fg_weight in the reconstruction loss
    log_every: int = 250
    ckpt_every: int = 1000


@dataclass(frozen=True)
class DitTraining:
    steps: int = 10_000
    batch_size: int = 512
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    uncond_prob: float = 0.1  # empty prompt, so that classifier-free guidance can be used
    log_every: int = 500
    ckpt_every: int = 2000


@dataclass(frozen=True)
class Recipe:
    seed: int = SEED
    dataset_size: int = 60_000  # clips encoded once after the VAE; the DiT learns their latents
    vae: VaeTraining = VaeTraining()
    vae_long: VaeTraining | None = None  # a second VAE phase on 17-frame clips, fine-tuning the first
    vae_long_share: float = 0.4  # of the VAE's time, for vae_long
    dit: DitTraining = DitTraining()
    autocast: bool = True  # bfloat16 autocast on CUDA (weights and optimiser stay float32)
    cuda_graphs: bool = True  # on CUDA, replay each training step as a CUDA graph (eager if it cannot be captured)
    vae_share: float = 0.4  # of --max-minutes, at most, for the VAE
    vae_spatial: int = 8  # the VAE's spatial compression: a key of VAE_CONFIGS
    encode_share: float = 0.08  # of --max-minutes, at most, for encoding the clip set after the VAE


# One H200 (run_gpu.sh, 10 minutes): each training step is replayed as a CUDA graph (the models are
# so small that an eager step is bound by its ~12-17k kernel launches, whatever the batch), with large
# batches drawn from clip banks made once on the GPU. Graphed, the VAE is bound by arithmetic: ~6,000
# frames a second whatever the clip length (128 x 5 and 64 x 9 frames at 10.5 step/s, 32 x 17 at 9.75;
# ~44 TFLOP/s), so a bigger VAE batch costs time in proportion; the DiT ran 27.6 step/s at batch 512.
# The VAE trains in two phases (session 7's three H200 runs, 17-frame L1 per causal chunk):
# 5-frame clips learn fast (rec 0.037 after 1,839 steps) but leave the later chunks untrained
# (0.02 0.02 then 0.06-0.81; on 9 frames 0.027 0.022 0.024 0.089 0.418); 17-frame clips from scratch
# (1,583 steps at batch 32) dropped the shapes entirely (0.05 everywhere, background only). So: 5-frame
# clips first, then a fine-tune on 17-frame clips for the last 40% of the VAE's time, and the shape's
# pixels weighted x11 in both. The VAE's peak lr is lower than the DiT's: its loss sits on a plateau
# near 0.9 while the lr is high and drops only as the cosine brings it under ~3e-4 (CPU run: ~1.0
# at step 550, 0.46-0.59 at steps 725-850 as the lr fell from 4.6e-4 to 1.3e-4).
_GPU_VAE = VaeTraining(steps=20_000, batch_size=128, frames=5, bank_size=32_768, lr=6e-4, warmup=200, fg_weight=10.0,
                       log_every=250, ckpt_every=2000)
_GPU_VAE_LONG = VaeTraining(steps=10_000, batch_size=32, frames=17, bank_size=8_192, lr=2e-4, warmup=50,
                            fg_weight=10.0, log_every=250, ckpt_every=2000)
_GPU_DIT = DitTraining(steps=40_000, batch_size=512, lr=1e-3, warmup=500, log_every=1000, ckpt_every=5000)

RECIPES = {
    # One H200: run_gpu.sh stops each stage by the clock (--max-minutes) and exports what it has.
    "gpu": Recipe(dataset_size=60_000, vae=_GPU_VAE, vae_long=_GPU_VAE_LONG, dit=_GPU_DIT, vae_share=0.45,
                  encode_share=0.06),
    # One CPU core, under an hour (``--threads 1 --max-minutes 50``): 5-frame VAE clips only (no
    # 17-frame phase: the later chunks of a clip stay untrained) at batch 8 (at batch 4 the decoder
    # fell into giving one output for every clip), a small clip set (encoding costs ~0.11 s a clip), DiT batch 32. Far too little
    # training for the goal; it shows where the chain stands after an hour of one core.
    "cpu": Recipe(dataset_size=1500, vae_share=0.6, encode_share=0.08,
                  vae=VaeTraining(steps=1500, batch_size=8, frames=5, lr=1e-3, warmup=100, log_every=25,
                                  ckpt_every=100),
                  dit=DitTraining(steps=3000, batch_size=32, lr=1e-3, warmup=100, ema_decay=0.995, log_every=50,
                                  ckpt_every=200)),
    # Seconds on a CPU: the whole chain at toy size, for tests and for trying changes.
    "smoke": Recipe(dataset_size=6, autocast=False,
                    vae=VaeTraining(steps=2, batch_size=1, frames=5, warmup=1, fg_weight=10.0, log_every=1,
                                    ckpt_every=2),
                    vae_long=VaeTraining(steps=1, batch_size=1, frames=17, warmup=1, fg_weight=10.0, log_every=1,
                                         ckpt_every=1),
                    dit=DitTraining(steps=4, batch_size=4, warmup=2, log_every=2, ckpt_every=2)),
}


def recipe(name: str, vae_steps: int | None = None, dit_steps: int | None = None,
           dataset_size: int | None = None) -> Recipe:
    """A named recipe, with its stages' step counts or its clip count overridden where given."""
    return overridden(RECIPES[name], vae_steps, dit_steps, dataset_size)
