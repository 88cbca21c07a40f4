"""Qwen-Image DiT step: ditserve vs diffusers (eager and compiled block by block), same random weights
(bf16), through the shared `compare_step` (and compiled FP8 with `quantization="fp8"`).

At 1328² the image is 83x83 = 6889 packed patches; with 128 text tokens that is one forward of
the 60-block, 20B-parameter transformer at batch 1 (a real run does two per step, cond + uncond;
the README's Qwen rows are batch 1, so the bench stays there).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import replace

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
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT, QwenImageInputs, image_ids, text_ids
from ditserve.models.qwen_image.weights import qwen_image_key_map

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
FAST_BLOCK_GUARD = 1e-2  # compiled blocks vs float32 ones, or 1.5x diffusers' bf16 error (bench/common.py)
FP8_GUARD_REL_L2 = 3e-2  # the quality guard of issue 21 for --quantization fp8 (the whole step)
MODEL = "qwen-image"


def step_flops(cfg: QwenImageConfig, img_len: int, txt_len: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one forward; embeddings and modulation are negligible."""
    d, s = cfg.hidden_size, img_len + txt_len
    mlp = int(d * cfg.mlp_ratio)
    per_token = 2 * d * (3 * d + d + 2 * mlp)  # each token through its stream's qkv, out proj and MLP
    return batch * cfg.num_layers * (per_token * s + 4 * s * s * d)


def build(model: str = MODEL, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weight_scale: float = 0.5):
    """diffusers' QwenImageTransformer2DModel with random weights, and our QwenImageDiT holding the same values."""
    from diffusers import QwenImageTransformer2DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = QwenImageConfig.from_dict(arch)
    return random_pair(QwenImageTransformer2DModel, arch, QwenImageDiT, cfg, qwen_image_key_map(cfg), device, dtype,
                       weight_scale)


def grid(cfg: QwenImageConfig, height: int, width: int) -> tuple[int, int]:
    """Packed patch rows and columns of a height x width image (VAE x8, then patch_size)."""
    return height // (8 * cfg.patch_size), width // (8 * cfg.patch_size)


def inputs(cfg: QwenImageConfig, height: int, width: int, txt_len: int, device, dtype,
           batch: int = 1) -> QwenImageInputs:
    gen = torch.Generator(device).manual_seed(1)
    grids = [grid(cfg, height, width)]
    h2, w2 = grids[0]
    return QwenImageInputs(
        img=torch.randn(batch, h2 * w2, cfg.in_channels, generator=gen, device=device, dtype=dtype),
        txt=torch.randn(batch, txt_len, cfg.joint_attention_dim, generator=gen, device=device, dtype=dtype),
        timesteps=torch.full((batch,), 0.6, device=device, dtype=dtype),
        img_ids=image_ids(grids, device),
        txt_ids=text_ids(grids, txt_len, device),
    )


def ref_call(ref, inp: QwenImageInputs, grids: list[tuple[int, int]]):
    shapes = [[(1, h, w) for h, w in grids]] * inp.img.shape[0]
    return ref(hidden_states=inp.img, encoder_hidden_states=inp.txt, encoder_hidden_states_mask=inp.txt_mask,
               timestep=inp.timesteps, img_shapes=shapes, return_dict=False)[0]


def block_probe(ref, ours: QwenImageDiT, inp: QwenImageInputs, grids) -> UpdateProbe:
    """The first and the last block's update to the image stream, ours vs diffusers' blocks, from the same
    embedded inputs (ours with our MSRoPE table, diffusers' with its `pos_embed`; streams at `PROBE_SCALE` of
    their size, as in bench/flux.py: see UpdateProbe). The whole-model output of random weights barely depends
    on the blocks (the input projection dominates it), so this is the guard that catches block math and
    MSRoPE errors."""
    h = ours.embed(inp)
    (img, txt), (vec, rope, mask, mod_index) = h.streams, h.consts
    img, txt = img * PROBE_SCALE, txt * PROBE_SCALE
    freqs = ref.pos_embed([[(1, rows, cols) for rows, cols in grids]], device=img.device,
                          max_txt_seq_len=txt.shape[1])

    def run_ref(block, img, txt, vec, freqs):
        return block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None, temb=vec,
                     image_rotary_emb=freqs)[1]

    def probed(k: int) -> ProbedBlock:
        return ProbedBlock(ref.transformer_blocks[k], run_ref,
                           lambda dit: dit.blocks[k](img, txt, vec, rope, mask, mod_index)[0])

    return UpdateProbe(img, (img, txt, vec, freqs), {"first": probed(0), "last": probed(ours.cfg.num_layers - 1)})


def block_update_rel_l2(ref, ours: QwenImageDiT, inp: QwenImageInputs, grids) -> dict[str, float]:
    """The probe's updates, ours vs diffusers' bf16 blocks (what the eager guard judges)."""
    return block_probe(ref, ours, inp, grids).compare(ours)[0]


def compile_diffusers(ref) -> None:
    """diffusers' regional compilation of the repeated blocks its class names."""
    ref.compile_repeated_blocks(fullgraph=True)


def rebuild(model: str, device: str, dtype: torch.dtype):
    """A fresh pair for compare_step's fp8 variants. At 20B a pair is 80 GB and the build peaks at the
    diffusers model in float32 (80 GB) before the cast: the last variant's compiled modules must be gone,
    so cycles freed by compare_step's dynamo reset are collected here before anything is allocated."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return build(model, device, dtype)


@torch.no_grad()
def bench_step(model: str = MODEL, height: int = 1328, width: int = 1328, txt_len: int = 128,
               quantization: str | None = None, compare: bool = True, device: str = "cuda",
               compiled: bool = True, attention: str = "auto") -> dict:
    """One DiT forward (batch 1): diffusers eager and compiled vs ditserve eager and compiled (and compiled
    FP8 with `quantization="fp8"`, and the `attention` backend's variant when not "auto"), with the rel-L2
    guards."""
    dtype = torch.bfloat16
    built = [build(model, device, dtype)]
    cfg = built[0][1].cfg
    grids = [grid(cfg, height, width)]
    inp = inputs(cfg, height, width, txt_len, device, dtype)
    inp = replace(inp, rope=built[0][1].positional_tables(inp.img_ids, inp.txt_ids))  # once per run, as pipelines
    img_len = inp.img.shape[1]
    row = base_row(model, "bfloat16", f"{width}x{height}, {img_len}+{txt_len} tokens")
    case = StepCase(build=lambda: built.pop() if built else rebuild(model, device, dtype),
                    run_ours=lambda dit: dit(inp), run_ref=lambda r: ref_call(r, inp, grids),
                    block_probe=lambda r, dit: block_probe(r, dit, inp, grids), compile_ref=compile_diffusers,
                    flops=step_flops(cfg, img_len, txt_len), guard=GUARD_REL_L2,
                    fast_block_guard=FAST_BLOCK_GUARD, fp8_guard=FP8_GUARD_REL_L2)
    return compare_step(case, row, device, quantization, compare, compiled, attention)
