"""Wan text-to-video end to end (UMT5 + DiT + VAE, random weights at real size): ditserve vs diffusers.

One set of random weights — UMT5-XXL, the Wan 2.1 VAE and the DiT at their real sizes, the DiT's
scaled by 0.5 (`random_pair`) so activations stay finite — is built as diffusers' `WanPipeline` and
saved in diffusers format to a temporary folder, which ditserve's `Generator` loads as a user's
model folder: the same values on both sides. Both run the same prompt, negative prompt (""), seed,
size, steps and guidance (CFG 5.0, Wan's default: diffusers calls the DiT twice a step, cond then
uncond; ditserve batches the two into one call of batch 2).

Timed, back to back in one process (one pipeline on the device at a time, so each peak is its own):
diffusers eager, diffusers with `transformer.compile_repeated_blocks(fullgraph=True)`, ditserve in its
fast configuration (`enable_torch_compile=True`: per-block compile and CUDA graphs, warmed up at the
bench's shape), with `quantization="fp8"` the same with fp8 linears and, with `attention` (e.g. "fp8":
cuDNN's fp8 SDPA), once more with that attention backend (and the fp8 linears when asked). Each is warmed up with a
2-step run at the same shape first (ditserve's engine does it while it loads when compiling).

The default is 10 denoising steps (Wan's own is 50): at 480p x 81 a CFG step is ≈ 1.1-1.3 s and the
VAE decode ≈ 2 s, so the four timed runs, their warm-ups, two compilations of each side and saving
and loading ≈ 13 GiB of weights fit one 10-minute GPU call (≈ 6 min). `est_e2e_s_at_default_steps`
extends each total to 50 steps with its measured per-step time.

Row: base_row's fields; steps, default_steps, guidance_scale, cfg, setup_s, weights_gib;
diffusers_{eager,compiled}_{e2e_s, mean_step_s, peak_memory_gib} (a step: both CFG calls; the peak
over the timed run); ditserve[_fp8|_attn]_{e2e_s, stages_s, mean_step_s, peak_memory_gib (per stage),
load_s (weights, setup, warm-up), start_memory_gib}; frames: frames_finite, frames_std (a flat video
would make the PSNRs meaningless), psnr_ditserve_vs_diffusers_db and max_abs_diff_vs_diffusers (against
diffusers' eager frames), psnr_diffusers_compiled_vs_eager_db (bf16 noise between two right pipelines),
fp8_psnr_vs_bf16_db, fp8_psnr_vs_diffusers_db, attn_psnr_vs_bf16_db, attn_psnr_vs_diffusers_db;
speedup_vs_diffusers_{eager,compiled}, {fp8,attn}_speedup_vs_diffusers_compiled, est_e2e_s_at_default_steps.

`tiny=True` runs the same path at toy sizes (TINY_WAN, TINY_E2E, with sharpened weights so frames
follow prompt and guidance) in float32, on the CPU in seconds, where ditserve's frames must equal
diffusers' within 1/255 (DESIGN.md). fp8 needs CUDA: on the CPU its engine runs unquantised.
"""

from __future__ import annotations

import gc
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ditserve.bench.common import arch_kwargs, architectures, base_row, psnr, random_pair, wall_time

log = logging.getLogger(__name__)

PROMPT = "a red fox trots through fresh snow in a birch forest at sunrise, its breath steaming, slow tracking shot"
GUIDANCE = 5.0  # Wan 2.1's default CFG scale
DEFAULT_STEPS = 10  # of Wan's 50: the whole bench fits one 10-minute GPU call (module docstring)
SIZE = (480, 832, 81)  # height, width, frames: Wan2.1-T2V-1.3B's 480p
TINY_SIZE = (32, 32, 5)
WARMUP_STEPS = 2

# Toy sizes for CPU smoke runs (also benchmarks/bench_offload.py's --tiny): a DiT, and a UMT5 and VAE
# matching its widths (text_dim 16, 16 latent channels).
TINY_WAN = dict(cls="WanTransformer3DModel", attention_head_dim=16, cross_attn_norm=True, eps=1e-6, ffn_dim=64,
                freq_dim=32, in_channels=16, num_attention_heads=2, num_layers=6, out_channels=16,
                patch_size=[1, 2, 2], qk_norm="rms_norm_across_heads", rope_max_seq_len=64, text_dim=16)
TINY_E2E = {
    "text_encoder": dict(cls="UMT5EncoderModel", d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=2,
                         vocab_size=512, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                         relative_attention_max_distance=32),
    "vae": dict(cls="AutoencoderKLWan", base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True]),
}


def random_dit(model: str, tiny: bool, device, dtype: torch.dtype):
    """diffusers' Wan DiT with random weights (scaled by 0.5) and ours holding the same values."""
    from diffusers import WanTransformer3DModel

    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT
    from ditserve.models.wan.weights import wan_key_map

    arch = arch_kwargs(TINY_WAN if tiny else architectures()[model]["transformer"])
    cfg = WanConfig.from_dict(arch)
    return random_pair(WanTransformer3DModel, arch, WanDiT, cfg, wan_key_map(cfg), device, dtype)


def random_text_and_vae(model: str, tiny: bool, device, dtype: torch.dtype, folder: Path):
    """(tokenizer, UMT5 encoder, Wan VAE) with random weights, at `model`'s real sizes (TINY_E2E's with
    `tiny`), on `device` in `dtype`; the tokenizer (ditserve/bench/tokenizers.py) is written to
    `folder`/tokenizer."""
    import diffusers
    import transformers

    from ditserve.bench.tokenizers import save_t5_tokenizer

    parts = TINY_E2E if tiny else architectures()[model]
    save_t5_tokenizer(folder / "tokenizer")
    with torch.device(device):
        text = transformers.UMT5EncoderModel(transformers.UMT5Config(**arch_kwargs(parts["text_encoder"])))
        vae = diffusers.AutoencoderKLWan(**arch_kwargs(parts["vae"]))
    tokenizer = transformers.T5TokenizerFast.from_pretrained(str(folder / "tokenizer"))
    return tokenizer, text.to(dtype).eval().requires_grad_(False), vae.to(dtype).eval().requires_grad_(False)


def diffusers_pipeline(model: str, tiny: bool, device, dtype: torch.dtype, folder: Path):
    """diffusers' WanPipeline of random weights (see `random_dit`, `random_text_and_vae`) on `device`."""
    import diffusers

    ref_dit, ours = random_dit(model, tiny, device, dtype)
    del ours  # ditserve loads the saved folder, as a user's
    tokenizer, text, vae = random_text_and_vae(model, tiny, device, dtype, folder)
    if tiny:
        _sharpen(ref_dit, text)
    scheduler = diffusers.UniPCMultistepScheduler(**arch_kwargs(architectures()[model]["scheduler"]))
    pipe = diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, scheduler=scheduler,
                                 transformer=ref_dit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _sharpen(dit: torch.nn.Module, text: torch.nn.Module) -> None:
    """Toy weights whose frames follow the prompt and the guidance (as tests/tiny/wan.py's): with the
    default init the toy's frames barely move with either, and an agreement check would miss a wrong
    prompt or CFG. Sharp attention (norm gains about 3), larger weights elsewhere."""
    gen = torch.Generator().manual_seed(0)
    for name, p in dit.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(3.0 * (1 + 0.3 * noise) if "norm" in name and name.endswith("weight") else 0.2 * noise)
    for p in text.parameters():
        p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _gib(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.parameters()) / 2**30  # UMT5's tied embedding once


def _free(device: str) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _to_u8(frames: np.ndarray) -> np.ndarray:
    return (frames * 255).round().astype(np.uint8)


class _Diffusers:
    """diffusers' pipeline run as the bench runs it, with its per-step times (a CUDA event, or a clock,
    at each step's end: no sync)."""

    def __init__(self, pipe, settings: dict, device: str):
        self.pipe, self.settings, self.device = pipe, settings, torch.device(device)
        self.clock = None

    def _on_step(self, pipe, i, t, tensors) -> dict:
        self.clock.tick()
        return {}

    def __call__(self, steps: int) -> np.ndarray:
        from ditserve.pipelines.base import StepClock

        self.clock = StepClock(self.device)
        out = self.pipe(**{**self.settings, "num_inference_steps": steps},
                        generator=torch.Generator("cpu").manual_seed(0), output_type="np",
                        callback_on_step_end=self._on_step)
        return out.frames[0]

    def time(self, row: dict, name: str, steps: int, reps: int) -> np.ndarray:
        """Warm up (2 steps: cuDNN plans, the allocator; compiling, the compile), then time `reps` runs;
        the last run's frames, float [F, H, W, 3] in [0, 1]."""
        self(WARMUP_STEPS)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row[f"diffusers_{name}_e2e_s"], frames = wall_time(lambda: self(steps), reps)
        row[f"diffusers_{name}_mean_step_s"] = statistics.median(self.clock.durations()[1:] or [float("nan")])
        row[f"diffusers_{name}_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        log.info("diffusers %s: %.2f s", name, row[f"diffusers_{name}_e2e_s"])
        return frames


def _time_ditserve(row: dict, prefix: str, folder: Path, device: str, dtype: str, settings: dict, compile: bool,
                   quantization: str | None, reps: int, attention: str = "auto") -> np.ndarray:
    """ditserve's Generator on the saved folder in its fast configuration: load (compiling, warmed up
    at the bench's shape), time `reps` runs; the last run's frames, uint8 [F, H, W, 3]."""
    from ditserve.api import GenerationRequest
    from ditserve.config import AccelConfig, EngineConfig, ModelConfig
    from ditserve.runtime.engine import Engine
    from ditserve.runtime.generator import Generator

    cfg = EngineConfig(ModelConfig(str(folder), device, dtype),
                       accel=AccelConfig(compile=compile, quantization=quantization, attention=attention))
    cuda = device.startswith("cuda")  # what an earlier pipeline left behind would count in every peak: ≈ 0
    row[f"{prefix}_start_memory_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else None
    # compiling, the engine warms up (2 steps) at the bench's shape while it loads
    gen = Generator(Engine.from_config(cfg, warmup=[GenerationRequest(**settings)]))
    row[f"{prefix}_load_s"] = gen.engine.load_timings
    if not compile:
        gen.generate(**{**settings, "num_inference_steps": WARMUP_STEPS})
    row[f"{prefix}_e2e_s"], out = wall_time(lambda: gen.generate(**settings), reps)
    timings = out.timings
    row[f"{prefix}_stages_s"] = dict(timings.stages)
    row[f"{prefix}_mean_step_s"] = statistics.median(timings.steps)
    row[f"{prefix}_peak_memory_gib"] = timings.peak_memory_gib  # per stage (GPU)
    log.info("%s: %.2f s, stages %s", prefix, row[f"{prefix}_e2e_s"], timings.stages)
    return out.videos[0]


@torch.no_grad()
def bench_end_to_end(model: str = "wan2.1-t2v-1.3b", height: int | None = None, width: int | None = None,
                     num_frames: int | None = None, steps: int | None = None, quantization: str | None = None,
                     device: str = "cuda", tiny: bool = False, compile: bool = True, reps: int = 1,
                     folder: str | Path | None = None, attention: str = "auto") -> dict:
    """One row: diffusers' WanPipeline (eager; compiled with `compile`) vs ditserve's Generator (compiled
    with `compile`; fp8 too with `quantization="fp8"`; with `attention` other than "auto", that backend
    too) end to end on the same random weights.

    Sizes default to 480x832x81 (`tiny`: 32x32x5, float32; otherwise bfloat16); `steps` to
    DEFAULT_STEPS (None: that too). `reps` timed runs each (median). `folder`: where the weights are
    saved (≈ 13.5 GiB at real size; default a temporary folder, removed at the end)."""
    from ditserve.pipelines.wan import WAN_DEFAULTS

    if quantization not in (None, "fp8"):
        raise ValueError(f"unsupported quantization {quantization!r}; use fp8")

    h0, w0, f0 = TINY_SIZE if tiny else SIZE
    height, width, num_frames = height or h0, width or w0, num_frames or f0
    steps, default_steps = steps or DEFAULT_STEPS, WAN_DEFAULTS.num_inference_steps
    dtype = torch.float32 if tiny else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    settings = dict(prompt=PROMPT, negative_prompt="", height=height, width=width, num_frames=num_frames,
                    num_inference_steps=steps, guidance_scale=GUIDANCE, max_sequence_length=512)
    own_folder = folder is None
    folder = Path(tempfile.mkdtemp(prefix="wan_e2e_") if own_folder else folder)
    row = base_row(model, dtype_name, f"{width}x{height}x{num_frames}, {steps} steps (Wan's default "
                                      f"{default_steps}), CFG {GUIDANCE}" + (" (tiny)" if tiny else ""))
    row |= {"steps": steps, "default_steps": default_steps, "guidance_scale": GUIDANCE, "tiny": tiny,
            "compile": compile, "quantization": quantization, "attention_backend": attention, "reps": reps,
            "cfg": "diffusers: cond and uncond as two DiT calls a step; ditserve: one batched call of 2"}
    try:
        start = time.perf_counter()
        pipe = diffusers_pipeline(model, tiny, device, dtype, folder)
        built = time.perf_counter()
        pipe.save_pretrained(str(folder))  # ditserve loads these files: the same values
        row["setup_s"] = {"build": built - start, "save": time.perf_counter() - built}
        row["weights_gib"] = {name: _gib(getattr(pipe, name)) for name in ("text_encoder", "transformer", "vae")}
        log.info("random weights built and saved to %s: %s", folder, row["setup_s"])
        ref = _Diffusers(pipe, {k: v for k, v in settings.items() if k != "num_inference_steps"}, device)
        ref_frames = ref.time(row, "eager", steps, reps)
        row["frames_finite"] = bool(np.isfinite(ref_frames).all())
        ref_u8 = _to_u8(ref_frames)
        row["frames_std"] = float(ref_u8.std())  # a flat video would make every PSNR meaningless
        if compile:
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
            row["psnr_diffusers_compiled_vs_eager_db"] = psnr(_to_u8(ref.time(row, "compiled", steps, reps)), ref_u8)
        del pipe, ref  # one pipeline on the device at a time
        _free(device)
        log.info("wan e2e so far: %s", row)  # should a later part fail

        settings["seed"] = 0  # diffusers': a CPU generator seeded 0
        frames = _time_ditserve(row, "ditserve", folder, device, dtype_name, settings, compile, None, reps)
        _free(device)
        row["psnr_ditserve_vs_diffusers_db"] = psnr(frames, ref_u8)
        row["max_abs_diff_vs_diffusers"] = int(np.abs(frames.astype(int) - ref_u8.astype(int)).max())
        log.info("wan e2e so far: %s", row)
        if quantization == "fp8":
            frames8 = _time_ditserve(row, "ditserve_fp8", folder, device, dtype_name, settings, compile, "fp8", reps)
            _free(device)
            row["fp8_psnr_vs_bf16_db"] = psnr(frames8, frames)
            row["fp8_psnr_vs_diffusers_db"] = psnr(frames8, ref_u8)
        if attention != "auto":
            frames_a = _time_ditserve(row, "ditserve_attn", folder, device, dtype_name, settings, compile,
                                      quantization, reps, attention)
            _free(device)
            row["attn_psnr_vs_bf16_db"] = psnr(frames_a, frames)
            row["attn_psnr_vs_diffusers_db"] = psnr(frames_a, ref_u8)
    finally:
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)
    _ratios(row, steps, default_steps)
    log.info("wan e2e: %s", row)
    return row


def _ratios(row: dict, steps: int, default_steps: int) -> None:
    """Speed-ups over diffusers, and each total extended to Wan's default step count."""
    for name in ("eager", "compiled"):
        if f"diffusers_{name}_e2e_s" in row:
            row[f"speedup_vs_diffusers_{name}"] = row[f"diffusers_{name}_e2e_s"] / row["ditserve_e2e_s"]
    for variant in ("fp8", "attn"):
        if f"ditserve_{variant}_e2e_s" in row and "diffusers_compiled_e2e_s" in row:
            row[f"{variant}_speedup_vs_diffusers_compiled"] = (row["diffusers_compiled_e2e_s"]
                                                               / row[f"ditserve_{variant}_e2e_s"])
    row["est_e2e_s_at_default_steps"] = {
        side: row[f"{side}_e2e_s"] + (default_steps - steps) * row[f"{side}_mean_step_s"]
        for side in ("diffusers_eager", "diffusers_compiled", "ditserve", "ditserve_fp8", "ditserve_attn")
        if f"{side}_e2e_s" in row}
