"""Wan DiT step: ditserve vs diffusers (eager and compile_repeated_blocks), same random weights,
at the real sizes (1.3B at 832x480x81 = 32,760 tokens; 14B at 1280x720x81 = 75,600; Wan2.2-TI2V-5B at
1280x704x121 = 27,280 tokens through its 16x VAE, with per-token timesteps)."""

from __future__ import annotations

import gc
import logging
from dataclasses import replace

import torch

from ditserve.bench.common import (MATMUL_TFLOPS, arch_kwargs, architectures, base_row, median_time, random_pair,
                                   rel_l2, sustained_matmul_tflops)
from ditserve.models.wan.config import WanConfig
from ditserve.models.wan.model import WanDiT, WanInputs
from ditserve.models.wan.weights import wan_key_map
from ditserve.vae.wan import VideoLatentShape

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
FP8_GUARD_REL_L2 = 3e-2  # the issue's bound for the fp8 step against diffusers' bf16 step
TEXT_TOKENS = 512
DEFAULT_SIZE = (480, 832, 81)  # (height, width, frames): Wan 2.1's 480p, the CLI's default for the 2.1 rows
# TI2V-5B is trained at 720p only (704x1280 or 1280x704) and 121 frames at 24 fps (its pipeline's defaults)
DEFAULT_SIZES = {"wan2.2-ti2v-5b": (704, 1280, 121)}


def default_size(model: str) -> tuple[int, int, int]:
    """(height, width, frames) the step bench runs `model` at when the caller names none."""
    return DEFAULT_SIZES.get(model, DEFAULT_SIZE)


def vae_spatial(model: str) -> int:
    """The VAE's spatial factor: 8 (Wan 2.1's VAE), 16 (Wan 2.2's, TI2V-5B)."""
    return VideoLatentShape.from_config(architectures()[model].get("vae", {})).spatial


def per_token_timesteps(model: str) -> bool:
    """Whether the model's pipeline passes a timestep per token (`expand_timesteps` in model_index.json: TI2V-5B)."""
    return bool(architectures()[model].get("pipeline", {}).get("expand_timesteps"))


def build(model: str, device: str, dtype: torch.dtype, weight_scale: float = 0.5):
    from diffusers import WanTransformer3DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = WanConfig.from_dict(arch)
    return random_pair(WanTransformer3DModel, arch, WanDiT, cfg, wan_key_map(cfg), device, dtype, weight_scale)


def inputs(cfg: WanConfig, height: int, width: int, frames: int, device, dtype, *, spatial: int = 8,
           per_token: bool = False) -> WanInputs:
    """Random latents of a `frames` x height x width video through a VAE of `spatial` x (4x in time), UMT5-sized
    text and timestep 600; with `per_token`, [1, L] timesteps as TI2V's pipeline passes them for a video
    from an image: 0 on the first latent frame's tokens (the image), 600 on the rest."""
    gen = torch.Generator(device).manual_seed(1)
    shape = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // spatial, width // spatial)
    timesteps = torch.full((1,), 600.0, device=device)
    if per_token:
        pt, ph, pw = cfg.patch_size
        per = torch.ones(shape[2] // pt, shape[3] // ph, shape[4] // pw, device=device)
        per[0] = 0
        timesteps = per.flatten()[None] * timesteps[:, None]
    return WanInputs(latents=torch.randn(shape, generator=gen, device=device, dtype=dtype), timesteps=timesteps,
                     context=torch.randn(1, TEXT_TOKENS, cfg.text_dim, generator=gen, device=device, dtype=dtype))


def step_flops(cfg: WanConfig, tokens: int, text: int = TEXT_TOKENS, per_token_time: bool = False) -> float:
    """Matmul + attention FLOPs of one forward (batch 1); with `per_token_time` also the time embedding
    and its six modulation vectors computed for every token (TI2V: ≈ 0.7 % more at 27k tokens)."""
    d, f = cfg.hidden_size, cfg.ffn_dim
    self_attn = 2 * tokens * d * d * 4 + 4 * tokens * tokens * d
    cross = 2 * tokens * d * d * 2 + 2 * text * d * d * 2 + 4 * tokens * text * d
    ffn = 2 * tokens * d * f * 2
    time = 2 * tokens * d * (cfg.freq_dim + d + 6 * d) if per_token_time else 0
    return cfg.num_layers * (self_attn + cross + ffn) + time


def ref_call(ref, inp: WanInputs):
    return ref(hidden_states=inp.latents, timestep=inp.timesteps, encoder_hidden_states=inp.context,
               return_dict=False)[0]


def block_update_rel_l2(ref, ours, inp: WanInputs) -> float:
    """rel L2 of the first block's update, ours vs diffusers' block, from the same embedded inputs:
    the whole-model output of random weights barely depends on the blocks, this catches block math.
    The stream enters at 1/100 of its size (the block LayerNorms it: the same update) so that in bf16
    the update is not lost in the rounding of the residual sum."""
    h = ours.embed(inp)
    x, (context, mod, rope) = h.streams[0] * 0.01, h.consts[:3]
    blocks = ours.blocks
    got = blocks[0](x, context, mod, rope) - x
    rotary = ref.rope(inp.latents)
    expected = ref.blocks[0](x, context, mod, rotary) - x
    return rel_l2(got, expected)


@torch.no_grad()
def bench_step(model: str = "wan2.1-t2v-1.3b", height: int = 480, width: int = 832, frames: int = 81,
               quantization: str | None = None, compare: bool = True, device: str = "cuda",
               compiled: bool = True, reps: int = 10, attention: str = "auto") -> dict:
    """One DiT forward: diffusers eager and compiled vs ditserve eager, compiled (+ segment graphs)
    and, with fp8, compiled fp8; guard: rel L2 against diffusers' bf16 step. With `attention` other
    than "auto", the compiled step once more with that backend (fields `attn_`; with fp8 linears
    too, `fp8_attn_`), each with the step's rel L2 against diffusers' bf16 step."""
    from ditserve.accel import accelerate_dit
    from ditserve.accel.token_kernels import remove_eager_kernels
    from ditserve.config import AccelConfig

    dtype = torch.bfloat16
    ref, ours = build(model, device, dtype)
    per_token = per_token_timesteps(model)
    inp = inputs(ours.cfg, height, width, frames, device, dtype, spatial=vae_spatial(model), per_token=per_token)
    grid = ours.grid(inp.latents.shape)
    inp = replace(inp, rope=ours.positional_tables(grid, device))
    tokens = grid[0] * grid[1] * grid[2]
    flops = step_flops(ours.cfg, tokens, per_token_time=per_token)
    shape = f"{width}x{height}x{frames}, {tokens}+{TEXT_TOKENS} tokens" + (", per-token timesteps" if per_token else "")
    row = base_row(model, "bfloat16", shape)
    row.update(step_tflop=flops / 1e12, floor_step_s=flops / (MATMUL_TFLOPS["bfloat16"] * 1e12))
    if device == "cuda":
        row["sustained_bf16_tflops"] = sustained_matmul_tflops("bfloat16", seconds=3.0)
        row["sustained_floor_step_s"] = flops / (row["sustained_bf16_tflops"] * 1e12)
    expected = ref_call(ref, inp)
    eager_reps = max(1, reps // 2)  # 14B at 720p is ~12 s a forward: the caller picks how many
    row["reps"] = reps
    accelerate_dit(ours, AccelConfig(), torch.device(device))  # eager as the engine runs it (token kernels on CUDA)
    row["ditserve_eager_step_s"] = median_time(lambda: ours(inp), warmup=1, reps=eager_reps)
    row["rel_l2_eager"] = rel_l2(ours(inp), expected)
    if compare:
        row["diffusers_eager_step_s"] = median_time(lambda: ref_call(ref, inp), warmup=1, reps=eager_reps)
    row["rel_l2_block_update_eager"] = block_update_rel_l2(ref, ours, inp)
    row["guard_ok"] = max(row["rel_l2_eager"], row["rel_l2_block_update_eager"]) <= GUARD_REL_L2
    if not compiled:
        return row
    remove_eager_kernels(ours)  # compiled, inductor fuses the same ops
    fast = accelerate_dit(ours, AccelConfig(compile=True), torch.device(device))
    row["ditserve_step_s"] = median_time(lambda f=fast: f(inp), warmup=2, reps=reps)
    row["rel_l2_vs_diffusers"] = rel_l2(fast(inp), expected)
    row["rel_l2_block_update"] = block_update_rel_l2(ref, fast, inp)
    row["fraction_of_floor"] = row["floor_step_s"] / row["ditserve_step_s"]
    if compare:
        ref.compile_repeated_blocks(fullgraph=True)
        row["diffusers_compiled_step_s"] = median_time(lambda: ref_call(ref, inp), warmup=2, reps=reps)
        row["speedup_vs_diffusers_compiled"] = row["diffusers_compiled_step_s"] / row["ditserve_step_s"]
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_step_s"]
    log.info("wan bf16: %s", row)
    row["guard_ok"] = (row["guard_ok"] and row["rel_l2_vs_diffusers"] <= GUARD_REL_L2
                       and row["rel_l2_block_update"] <= 2 * GUARD_REL_L2)  # compiled rounds elsewhere
    variants = [("fp8", "fp8", "auto")] if quantization == "fp8" else []
    if attention != "auto":
        variants.append(("fp8_attn" if quantization == "fp8" else "attn", quantization, attention))
    if variants:
        del ours, fast
    for prefix, quant, attn in variants:
        gc.collect()
        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
        _, fresh = build(model, device, dtype)  # same seed: the same weights
        variant = accelerate_dit(fresh, AccelConfig(compile=True, quantization=quant, attention=attn),
                                 torch.device(device))
        row[f"ditserve_{prefix}_step_s"] = median_time(lambda f=variant: f(inp), warmup=2, reps=reps)
        row[f"{prefix}_attention"] = attn
        row[f"{prefix}_rel_l2_vs_diffusers_bf16"] = rel_l2(variant(inp), expected)
        row[f"{prefix}_rel_l2_block_update"] = block_update_rel_l2(ref, variant, inp)
        if compare:
            row[f"{prefix}_speedup_vs_diffusers_compiled"] = (row["diffusers_compiled_step_s"]
                                                              / row[f"ditserve_{prefix}_step_s"])
        row[f"{prefix}_guard_ok"] = row[f"{prefix}_rel_l2_vs_diffusers_bf16"] <= FP8_GUARD_REL_L2
        del fresh, variant
    if quantization == "fp8":
        row["fp8_floor_step_s"] = flops / (MATMUL_TFLOPS["fp8"] * 1e12)
        row["guard_ok"] = row["guard_ok"] and row["fp8_guard_ok"]
    return row


@torch.no_grad()
def bench_vae_decode(height: int = 480, width: int = 832, frames: int = 81, device: str = "cuda",
                     model: str = "wan2.1-t2v-1.3b") -> dict:
    """`model`'s VAE (Wan 2.1's; Wan 2.2's for TI2V-5B) decoding one video at real size (random weights):
    time and peak memory, whole and tiled."""
    from diffusers import AutoencoderKLWan

    from ditserve.vae.wan import decode_wan

    arch = arch_kwargs(architectures()[model]["vae"])
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**arch).to(torch.bfloat16).eval()
    channels, *grid = VideoLatentShape.from_config(arch).latents(frames, height, width)
    latents = torch.randn(1, channels, *grid, device=device)
    row = base_row(f"{model.split('-')[0]}-vae", "bfloat16", f"{width}x{height}x{frames}")  # wan2.1-vae, wan2.2-vae
    for tiled in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        key = "tiled" if tiled else "whole"
        row[f"decode_{key}_s"] = median_time(lambda t=tiled: decode_wan(vae, latents, tiled=t), warmup=1, reps=2)
        row[f"decode_{key}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row
