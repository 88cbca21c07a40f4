"""SD3.5 (Large, Medium) DiT step: ditserve vs diffusers (eager and compiled block by block), same random
weights (bf16).

At 1024² the latents are 128x128, 64x64 = 4096 patches; the text is 77 CLIP + 256 T5 = 333 tokens. A real
step runs cond and uncond as one batch of 2 (CFG, as the pipeline batches it), so that is the default.
"""

from __future__ import annotations

import logging

import torch

from ditserve.bench.common import (
    PROBE_SCALE,
    ProbedBlock,
    StepCase,
    UpdateProbe,
    arch_kwargs,
    architectures,
    base_row,
    compare_step,
    random_pair,
)
from ditserve.models.sd3.config import SD3Config
from ditserve.models.sd3.model import SD3DiT, SD3Inputs
from ditserve.models.sd3.weights import sd3_key_map

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
FAST_BLOCK_GUARD = 1e-2  # compiled blocks vs float32 ones, or 1.5x diffusers' bf16 error (bench/common.py)
FP8_GUARD_REL_L2 = 3e-2  # the quality guard of issue 18 for --quantization fp8 (the whole step)
MODEL = "sd3.5-large"
TXT_LEN = 77 + 256


def step_flops(cfg: SD3Config, img_len: int, txt_len: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one forward; embeddings and modulation are negligible."""
    d, s = cfg.hidden_size, img_len + txt_len
    per_token = 2 * d * (3 * d + d + 8 * d)  # q/k/v, output projection, 4x MLP
    total = 0.0
    for i in range(cfg.num_layers):
        last = i == cfg.num_layers - 1
        total += per_token * img_len + (2 * d * 3 * d if last else per_token) * txt_len + 4 * s * s * d
        if i in cfg.dual_attention_layers:  # MMDiT-X: image-only attention
            total += 2 * d * 4 * d * img_len + 4 * img_len * img_len * d
    return batch * total


def build(model: str = MODEL, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weight_scale: float = 0.5):
    """diffusers' SD3Transformer2DModel with random weights, and our SD3DiT holding the same values."""
    from diffusers import SD3Transformer2DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = SD3Config.from_dict(arch)
    return random_pair(SD3Transformer2DModel, arch, SD3DiT, cfg, sd3_key_map(cfg), device, dtype, weight_scale)


def inputs(cfg: SD3Config, height: int, width: int, txt_len: int, device, dtype, batch: int = 2) -> SD3Inputs:
    gen = torch.Generator(device).manual_seed(1)
    return SD3Inputs(
        x=torch.randn(batch, cfg.in_channels, height // 8, width // 8, generator=gen, device=device, dtype=dtype),
        txt=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=gen, device=device, dtype=dtype),
        pooled=torch.randn(batch, cfg.pooled_projection_dim, generator=gen, device=device, dtype=dtype),
        timesteps=torch.full((batch,), 600.0, device=device),
    )


def ref_call(ref, inp: SD3Inputs):
    return ref(hidden_states=inp.x, encoder_hidden_states=inp.txt, pooled_projections=inp.pooled,
               timestep=inp.timesteps, return_dict=False)[0]


def block_probe(ref, ours: SD3DiT, inp: SD3Inputs) -> UpdateProbe:
    """The first and the last block's update to the image stream, ours vs diffusers' blocks, from the same
    embedded inputs (the first is dual-attention on SD3.5-Medium; the last is context-pre-only). The whole
    output of random weights barely depends on the blocks, so this is the guard that catches block math.
    Streams at `PROBE_SCALE` of their size, as in bench/flux.py (see UpdateProbe)."""
    h = ours.embed(inp)
    (img, txt), (vec, grid) = h.streams, h.consts
    img, txt = img * PROBE_SCALE, txt * PROBE_SCALE

    def run_ref(block, img, txt, vec):
        return block(hidden_states=img, encoder_hidden_states=txt, temb=vec)[1]

    def probed(k: int) -> ProbedBlock:
        return ProbedBlock(ref.transformer_blocks[k], run_ref, lambda dit: dit.blocks[k](img, txt, vec, grid)[0])

    return UpdateProbe(img, (img, txt, vec), {"first": probed(0), "last": probed(ours.cfg.num_layers - 1)})


def block_update_rel_l2(ref, ours: SD3DiT, inp: SD3Inputs) -> dict[str, float]:
    """The probe's updates, ours vs diffusers' bf16 blocks (what the eager guard judges)."""
    return block_probe(ref, ours, inp).compare(ours)[0]


def compile_diffusers(ref) -> None:
    """diffusers' regional compilation: `compile_repeated_blocks` where the class names its repeated
    blocks; SD3Transformer2DModel (0.42) names none, so each of its joint blocks, as that would."""
    try:
        ref.compile_repeated_blocks(fullgraph=True)
    except ValueError:  # `_repeated_blocks` is empty
        for block in ref.transformer_blocks:
            block.compile(fullgraph=True)


@torch.no_grad()
def bench_step(model: str = MODEL, height: int = 1024, width: int = 1024, txt_len: int = TXT_LEN,
               quantization: str | None = None, compare: bool = True, device: str = "cuda",
               compiled: bool = True, batch: int = 2, attention: str = "auto") -> dict:
    """One DiT forward of a CFG batch: diffusers eager and compiled vs ditserve eager and compiled
    (and compiled FP8 with `quantization="fp8"`), with the rel-L2 guards."""
    dtype = torch.bfloat16
    built = [build(model, device, dtype)]
    cfg = built[0][1].cfg
    inp = inputs(cfg, height, width, txt_len, device, dtype, batch)
    img_len = (height // 8 // cfg.patch_size) * (width // 8 // cfg.patch_size)
    row = base_row(model, "bfloat16", f"{width}x{height}, {img_len}+{txt_len} tokens, batch {batch} (CFG)")
    case = StepCase(build=lambda: built.pop() if built else build(model, device, dtype),
                    run_ours=lambda dit: dit(inp), run_ref=lambda r: ref_call(r, inp),
                    block_probe=lambda r, dit: block_probe(r, dit, inp), compile_ref=compile_diffusers,
                    flops=step_flops(cfg, img_len, txt_len, batch), guard=GUARD_REL_L2,
                    fast_block_guard=FAST_BLOCK_GUARD, fp8_guard=FP8_GUARD_REL_L2, fast_timing=(3, 20))
    return compare_step(case, row, device, quantization, compare, compiled, attention)
