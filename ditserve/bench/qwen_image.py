"""Qwen-Image DiT step: ditserve vs diffusers, eager and compiled, same random weights (bf16).

At 1328² the image is 83x83 = 6889 packed patches; with 128 text tokens that is one forward of
the 60-block, 20B-parameter transformer at batch 1 (a real run does two per step, cond + uncond).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ditserve.bench.common import MATMUL_TFLOPS, arch_kwargs, architectures, base_row, median_time, random_pair, rel_l2
from ditserve.models.qwen_image.config import QwenImageConfig
from ditserve.models.qwen_image.model import QwenImageDiT, QwenImageInputs, image_ids, text_ids
from ditserve.models.qwen_image.weights import qwen_image_key_map

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
MODEL = "qwen-image"


def step_flops(cfg: QwenImageConfig, img_len: int, txt_len: int) -> float:
    """Matmul + attention FLOPs of one forward (batch 1); embeddings and modulation are negligible."""
    d, s = cfg.hidden_size, img_len + txt_len
    mlp = int(d * cfg.mlp_ratio)
    per_token = 2 * d * (3 * d + d + 2 * mlp)  # each token through its stream's qkv, out proj and MLP
    return cfg.num_layers * (per_token * s + 4 * s * s * d)


def build(model: str = MODEL, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weight_scale: float = 0.5):
    """diffusers' QwenImageTransformer2DModel with random weights, and our QwenImageDiT holding the same values."""
    from diffusers import QwenImageTransformer2DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = QwenImageConfig.from_dict(arch)
    return random_pair(QwenImageTransformer2DModel, arch, QwenImageDiT, cfg, qwen_image_key_map(cfg), device, dtype, weight_scale)


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


def block_update_rel_l2(ref, ours: QwenImageDiT, inp: QwenImageInputs, grids) -> float:
    """rel L2 of the first block's update to the image stream, ours vs diffusers' block, from the same
    embedded inputs. The whole-model output of random weights barely depends on the blocks (the
    input projection dominates it), so this is the guard that catches block math and MSRoPE errors."""
    h = ours.embed(inp)
    (img, txt), (vec, rope, mask, mod_index) = h.streams, h.consts
    freqs = ref.pos_embed([[(1, h, w) for h, w in grids]], device=img.device, max_txt_seq_len=txt.shape[1])
    _, img_ref = ref.transformer_blocks[0](hidden_states=img, encoder_hidden_states=txt,
                                           encoder_hidden_states_mask=None, temb=vec, image_rotary_emb=freqs)
    img_ours, _ = ours.blocks[0](img, txt, vec, rope, mask, mod_index)
    return rel_l2(img_ours - img, img_ref - img)


@torch.no_grad()
def bench_step(model: str = MODEL, height: int = 1328, width: int = 1328, txt_len: int = 128,
               compare: bool = True, device: str = "cuda", compiled: bool = True) -> dict:
    """One DiT forward (batch 1): eager and compiled, ditserve vs diffusers, with the rel-L2 guard."""
    from ditserve.accel import accelerate_dit
    from ditserve.config import AccelConfig

    dtype = torch.bfloat16
    ref, ours = build(model, device, dtype)
    inp = inputs(ours.cfg, height, width, txt_len, device, dtype)
    grids = [grid(ours.cfg, height, width)]
    inp = replace(inp, rope=ours.positional_tables(inp.img_ids, inp.txt_ids))  # once per run, as pipelines do
    flops = step_flops(ours.cfg, inp.img.shape[1], txt_len)
    row = base_row(model, "bfloat16", f"{width}x{height}, {inp.img.shape[1]}+{txt_len} tokens")
    row["step_tflop"] = flops / 1e12
    row["floor_step_s"] = flops / (MATMUL_TFLOPS["bfloat16"] * 1e12)

    expected = ref_call(ref, inp, grids)
    row["ditserve_eager_step_s"] = median_time(lambda: ours(inp))
    row["rel_l2_eager"] = rel_l2(ours(inp), expected)
    row["rel_l2_block0_update"] = block_update_rel_l2(ref, ours, inp, grids)
    row["guard_ok"] = max(row["rel_l2_eager"], row["rel_l2_block0_update"]) <= GUARD_REL_L2
    row["fraction_of_floor_eager"] = row["floor_step_s"] / row["ditserve_eager_step_s"]
    if compare:
        row["diffusers_eager_step_s"] = median_time(lambda: ref_call(ref, inp, grids))
        row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_eager_step_s"]
    log.info("qwen-image eager: %s", row)
    if compiled:
        fast = accelerate_dit(ours, AccelConfig(compile=True), torch.device(device))
        row["ditserve_step_s"] = median_time(lambda: fast(inp), warmup=3, reps=10)
        row["rel_l2_compiled"] = rel_l2(fast(inp), expected)
        row["fraction_of_floor"] = row["floor_step_s"] / row["ditserve_step_s"]
        if compare:
            row["speedup_vs_diffusers_eager"] = row["diffusers_eager_step_s"] / row["ditserve_step_s"]
            ref.compile_repeated_blocks(fullgraph=True)
            row["diffusers_compiled_step_s"] = median_time(lambda: ref_call(ref, inp, grids), warmup=3, reps=10)
            row["speedup_vs_diffusers_compiled"] = row["diffusers_compiled_step_s"] / row["ditserve_step_s"]
    return row
