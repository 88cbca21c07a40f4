"""HunyuanVideo DiT step: ditserve vs diffusers (eager and compiled block by block), same random weights
(bf16).

At 1280x720 and 129 frames the latents are 33x90x160, 2x2 patches: 33·45·80 = 118,800 video tokens (544x960:
33·34·60 = 67,320). The pipelines differ in the text they hand the DiT, and each is timed as its pipeline
runs it: diffusers' pads the prompt to 256 tokens and masks the padding; ours drops the padding (it is masked
out of every attention anyway) and attends without a mask. `txt_len` real prompt tokens (64 by default, the
template's user part plus a prompt of a few dozen tokens). One forward per step (embedded guidance, no CFG).
"""

from __future__ import annotations

import logging

import torch

from ditserve.bench.common import (PROBE_SCALE, ProbedBlock, StepCase, UpdateProbe, arch_kwargs, architectures,
                                   base_row, compare_step, random_pair)
from ditserve.models.hunyuan_video.config import HunyuanVideoConfig
from ditserve.models.hunyuan_video.model import HunyuanVideoDiT, HunyuanVideoInputs, pack, unpack
from ditserve.models.hunyuan_video.weights import hunyuan_video_key_map

log = logging.getLogger(__name__)
GUARD_REL_L2 = 1e-2
FAST_BLOCK_GUARD = 1e-2  # compiled blocks vs float32 ones, or 1.5x diffusers' bf16 error (bench/common.py)
FP8_GUARD_REL_L2 = 3e-2  # the quality guard of issue 19 for --quantization fp8 (the whole step)
MODEL = "hunyuanvideo"
PADDED_TEXT = 256  # diffusers' max_sequence_length


def step_flops(cfg: HunyuanVideoConfig, video_len: int, txt_len: int, batch: int = 1) -> float:
    """Matmul + attention FLOPs of one forward over `video_len + txt_len` tokens: dual-stream blocks
    (q/k/v, output, 4x MLP: 12·d² per token) and single-stream blocks (q/k/v + MLP in, [attention, MLP]
    out: 12·d² per token), joint attention in both; the token refiner and embeddings are negligible."""
    d, s = cfg.hidden_size, video_len + txt_len
    layers = cfg.num_layers + cfg.num_single_layers
    return batch * layers * (2 * d * 12 * d * s + 4 * s * s * d)


def build(model: str = MODEL, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, weight_scale: float = 0.5):
    """diffusers' HunyuanVideoTransformer3DModel with random weights, and our DiT with the same values."""
    from diffusers import HunyuanVideoTransformer3DModel

    arch = arch_kwargs(architectures()[model]["transformer"])
    cfg = HunyuanVideoConfig.from_dict(arch)
    return random_pair(HunyuanVideoTransformer3DModel, arch, HunyuanVideoDiT, cfg, hunyuan_video_key_map(cfg),
                       device, dtype, weight_scale)


class Case:
    """The latents and text of one step, as each pipeline hands them to its DiT."""

    def __init__(self, ours: HunyuanVideoDiT, height: int, width: int, num_frames: int, txt_len: int, device,
                 dtype: torch.dtype, batch: int = 1):
        cfg = ours.cfg
        gen = torch.Generator(device).manual_seed(1)
        self.x = torch.randn(batch, cfg.in_channels, (num_frames - 1) // 4 + 1, height // 8, width // 8,
                             generator=gen, device=device, dtype=dtype)
        self.txt = torch.randn(batch, PADDED_TEXT, cfg.text_embed_dim, generator=gen, device=device, dtype=dtype)
        self.mask = torch.zeros(batch, PADDED_TEXT, device=device, dtype=dtype)
        self.mask[:, :txt_len] = 1
        self.pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen, device=device, dtype=dtype)
        self.t = torch.full((batch,), 600.0, device=device, dtype=dtype)
        self.guidance = torch.full((batch,), 6000.0, device=device, dtype=dtype)
        self.grid = ours.grid(self.x.shape)
        self.txt_len = txt_len
        self.ours = HunyuanVideoInputs(pack(self.x, cfg.patch), self.grid, self.t, self.txt[:, :txt_len], self.pooled,
                                       guidance=self.guidance,
                                       rope=ours.positional_tables(self.grid, txt_len, device))

    def video_len(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def ref(self, ref):
        return ref(hidden_states=self.x, timestep=self.t, encoder_hidden_states=self.txt,
                   encoder_attention_mask=self.mask, pooled_projections=self.pooled, guidance=self.guidance,
                   return_dict=False)[0]

    def run(self, dit, patch) -> torch.Tensor:
        return unpack(dit(self.ours), self.grid, patch)


def block_probe(ref, ours: HunyuanVideoDiT, case: Case) -> UpdateProbe:
    """The first dual-stream and the last single-stream block's update to the video stream, ours vs diffusers'
    blocks, from the same embedded inputs (streams at `PROBE_SCALE` of their size, as in bench/flux.py: see
    UpdateProbe). The output of random weights barely depends on the blocks, so this is the guard that
    catches block math."""
    h = ours.embed(case.ours)
    (img, txt), (vec, rope, _) = h.streams, h.consts
    img, txt = img * PROBE_SCALE, txt * PROBE_SCALE
    freqs = ref.rope(case.x)

    def run_ref(block, img, txt, vec, freqs):
        return block(img, txt, vec, None, freqs)[0]

    return UpdateProbe(img, (img, txt, vec, freqs), {
        "first_double": ProbedBlock(ref.transformer_blocks[0], run_ref,
                                    lambda dit: dit.double_blocks[0](img, txt, vec, rope)[0]),
        "last_single": ProbedBlock(ref.single_transformer_blocks[-1], run_ref,
                                   lambda dit: dit.single_blocks[-1](img, txt, vec, rope)[0])})


def block_update_rel_l2(ref, ours: HunyuanVideoDiT, case: Case) -> dict[str, float]:
    """The probe's updates, ours vs diffusers' bf16 blocks (what the eager guard judges)."""
    return block_probe(ref, ours, case).compare(ours)[0]


def compile_diffusers(ref) -> None:
    """diffusers' regional compilation of the repeated blocks its class names."""
    ref.compile_repeated_blocks(fullgraph=True)


@torch.no_grad()
def bench_step(model: str = MODEL, height: int = 720, width: int = 1280, num_frames: int = 129,
               quantization: str | None = None, compare: bool = True, device: str = "cuda",
               compiled: bool = True, txt_len: int = 64, reps: int = 5, attention: str = "auto",
               fp8_alone: bool = True) -> dict:
    """One DiT forward: diffusers eager and compiled vs ditserve eager and compiled (and compiled FP8 with
    `quantization="fp8"`), with the rel-L2 guards.

    Trimmed for long sequences (720p: 119k tokens, ≈ 20 s a call), one warm-up each: ours eager 1 + `reps`
    calls; diffusers eager `reps` (ours warmed the GPU; its last call is the reference output); ours compiled
    1 + `reps`, where the first call compiles, runs each segment twice (SegmentGraph's warm-up), captures its
    CUDA graph and replays it (≈ 3 calls' work), so the next is already a replay; diffusers compiled 1
    (compiling) + `reps`; ours fp8 as ours compiled. With `reps=1`: 9 calls (≈ 13 calls' work) and 3
    compilations, where each variant used to take one more warm-up and one more call for its output (≈ 21
    calls' work; ≈ 8 × 20 s more at 720p). The guards judge the output of the last timed call. The block
    probe: diffusers' two probed blocks once in bf16 and once in float32 (≈ 10 s at 720p on the H200), ours
    once per variant (≈ 0.8 s each)."""
    dtype = torch.bfloat16
    built = [build(model, device, dtype)]
    ours = built[0][1]
    patch = ours.cfg.patch
    case = Case(ours, height, width, num_frames, txt_len, device, dtype)
    video_len = case.video_len()
    shape = (f"{width}x{height}x{num_frames}, {video_len}+{txt_len} tokens "
             f"(diffusers: {video_len}+{PADDED_TEXT}, padding masked)")
    row = base_row(model, "bfloat16", shape)
    row["diffusers_step_tflop"] = step_flops(ours.cfg, video_len, PADDED_TEXT) / 1e12
    step = StepCase(build=lambda: built.pop() if built else build(model, device, dtype),
                    run_ours=lambda dit: case.run(dit, patch), run_ref=case.ref,
                    block_probe=lambda r, dit: block_probe(r, dit, case), compile_ref=compile_diffusers,
                    flops=step_flops(ours.cfg, video_len, txt_len), guard=GUARD_REL_L2,
                    fast_block_guard=FAST_BLOCK_GUARD, fp8_guard=FP8_GUARD_REL_L2, eager_timing=(1, reps),
                    fast_timing=(1, reps))
    del ours
    return compare_step(step, row, device, quantization, compare, compiled, attention, fp8_alone)
