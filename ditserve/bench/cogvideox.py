"""CogVideoX-5B DiT step: ditserve vs diffusers (eager and compiled block by block), same random weights
(bf16).

At 720x480 and 49 frames the latents are 13x60x90, 2x2 patches: 13·30·45 = 17,550 video tokens, plus
226 T5 tokens in the same sequence. A real step runs uncond and cond as one batch of 2 (CFG, as the
pipeline batches it), so that is the default.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ditserve.bench.common import (PROBE_SCALE, ProbedBlock, StepCase, UpdateProbe, arch_kwargs, architectures,
                                   base_row, compare_step, random_pair)
from ditserve.models.cogvideox.config import CogVideoXConfig
from ditserve.models.cogvideox.model import CogVideoXDiT, CogVideoXInputs
from ditserve.models.cogvideox.weights import cogvideox_key_map

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
FAST_BLOCK_GUARD = 1e-2  # compiled blocks vs float32 ones, or 1.5x diffusers' bf16 error (bench/common.py)
FP8_GUARD_REL_L2 = 3e-2  # the quality guard of issue 20 for --quantization fp8 (the whole step)
MODEL = "cogvideox-5b"


def step_flops(cfg: CogVideoXConfig, video_len: int, txt_len: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one forward (every token through q/k/v, output and the 4x
    feed-forward; joint attention over all tokens); embeddings and modulation are negligible."""
    d, s = cfg.hidden_size, video_len + txt_len
    return batch * cfg.num_layers * (2 * d * 12 * d * s + 4 * s * s * d)


def build(model: str = MODEL, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weight_scale: float = 0.5):
    """diffusers' CogVideoXTransformer3DModel with random weights, and our CogVideoXDiT with the same values."""
    from diffusers import CogVideoXTransformer3DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = CogVideoXConfig.from_dict(arch)
    return random_pair(CogVideoXTransformer3DModel, arch, CogVideoXDiT, cfg, cogvideox_key_map(cfg), device, dtype,
                       weight_scale)


def inputs(ours: CogVideoXDiT, height: int, width: int, num_frames: int, device, dtype,
           batch: int = 2) -> CogVideoXInputs:
    cfg = ours.cfg
    gen = torch.Generator(device).manual_seed(1)
    f = (num_frames - 1) // cfg.temporal_compression_ratio + 1
    x = torch.randn(batch, f, cfg.in_channels, height // 8, width // 8, generator=gen, device=device, dtype=dtype)
    ctx = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen, device=device, dtype=dtype)
    inp = CogVideoXInputs(x, torch.full((batch,), 600.0, device=device), ctx)
    return replace(inp, rope=ours.positional_tables(ours.grid(x.shape), ctx.shape[1], device))


def diffusers_rope(cfg: CogVideoXConfig, inp: CogVideoXInputs):
    """The rotary table as diffusers' pipeline builds it (5B: the grid cropped to the trained aspect)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    if not cfg.use_rotary_positional_embeddings:
        return None
    p = cfg.patch_size
    f, (h, w) = inp.latents.shape[1], inp.latents.shape[3:]
    gh, gw = h // p, w // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), f, device=inp.latents.device)


def ref_call(ref, inp: CogVideoXInputs, rope):
    return ref(hidden_states=inp.latents, encoder_hidden_states=inp.context, timestep=inp.timesteps,
               image_rotary_emb=rope, return_dict=False)[0]


def block_probe(ref, ours: CogVideoXDiT, inp: CogVideoXInputs, rope) -> UpdateProbe:
    """The first and the last block's update to the video stream, ours vs diffusers' blocks, from the same
    embedded inputs (streams at `PROBE_SCALE` of their size, as in bench/flux.py: see UpdateProbe). The
    whole output of random weights barely depends on the blocks, so this is the guard that catches block
    math."""
    h = ours.embed(inp)
    (x, txt), (temb, table, _) = h.streams, h.consts
    x, txt = x * PROBE_SCALE, txt * PROBE_SCALE

    def run_ref(block, x, txt, temb, rope):
        return block(hidden_states=x, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rope)[0]

    def probed(k: int) -> ProbedBlock:
        return ProbedBlock(ref.transformer_blocks[k], run_ref, lambda dit: dit.blocks[k](x, txt, temb, table)[0])

    return UpdateProbe(x, (x, txt, temb, rope), {"first": probed(0), "last": probed(ours.cfg.num_layers - 1)})


def block_update_rel_l2(ref, ours: CogVideoXDiT, inp: CogVideoXInputs, rope) -> dict[str, float]:
    """The probe's updates, ours vs diffusers' bf16 blocks (what the eager guard judges)."""
    return block_probe(ref, ours, inp, rope).compare(ours)[0]


def compile_diffusers(ref) -> None:
    """diffusers' regional compilation: `compile_repeated_blocks` where the class names its repeated
    blocks, else each block, as that would."""
    try:
        ref.compile_repeated_blocks(fullgraph=True)
    except ValueError:  # `_repeated_blocks` is empty
        for block in ref.transformer_blocks:
            block.compile(fullgraph=True)


@torch.no_grad()
def bench_step(model: str = MODEL, height: int = 480, width: int = 720, num_frames: int = 49,
               quantization: str | None = None, compare: bool = True, device: str = "cuda",
               compiled: bool = True, batch: int = 2, attention: str = "auto") -> dict:
    """One DiT forward of a CFG batch: diffusers eager and compiled vs ditserve eager and compiled
    (and compiled FP8 with `quantization="fp8"`), with the rel-L2 guards."""
    dtype = torch.bfloat16
    built = [build(model, device, dtype)]
    ours = built[0][1]
    inp = inputs(ours, height, width, num_frames, device, dtype, batch)
    rope = diffusers_rope(ours.cfg, inp)
    f, gh, gw = ours.grid(inp.latents.shape)
    video_len, txt_len = f * gh * gw, inp.context.shape[1]
    shape = f"{width}x{height}x{num_frames}, {video_len}+{txt_len} tokens, batch {batch} (CFG)"
    row = base_row(model, "bfloat16", shape)
    case = StepCase(build=lambda: built.pop() if built else build(model, device, dtype),
                    run_ours=lambda dit: dit(inp), run_ref=lambda r: ref_call(r, inp, rope),
                    block_probe=lambda r, dit: block_probe(r, dit, inp, rope),
                    compile_ref=compile_diffusers, flops=step_flops(ours.cfg, video_len, txt_len, batch),
                    guard=GUARD_REL_L2, fast_block_guard=FAST_BLOCK_GUARD, fp8_guard=FP8_GUARD_REL_L2)
    del ours
    return compare_step(case, row, device, quantization, compare, compiled, attention)
