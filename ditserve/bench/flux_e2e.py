"""FLUX end to end (CLIP-L + T5-XXL + DiT + VAE, random weights at real size): ditserve vs diffusers.

Both pipelines share the same text encoders, VAE and transformer weights; ditserve runs its fast
configuration (per-block compile, CUDA graphs; FP8 when asked). Reports totals,
ditserve's stage split, and for FP8 the PSNR of its image against the bf16 image for the same seed.
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from ditserve.api import GenerationRequest
from ditserve.bench.common import arch_kwargs, architectures, base_row, psnr, wall_time
from ditserve.bench.flux import build
from ditserve.config import AccelConfig

log = logging.getLogger(__name__)
PROMPT = "a photograph of a lighthouse on a cliff at dusk, waves crashing below, volumetric light"


def _random_encoders(arch: dict, folder: Path, device, dtype):
    import transformers

    from ditserve.bench.tokenizers import save_clip_tokenizer, save_t5_tokenizer

    save_clip_tokenizer(folder / "tokenizer")
    save_t5_tokenizer(folder / "tokenizer_2")
    clip_cfg = transformers.CLIPTextConfig(**arch_kwargs(arch["text_encoder"]))
    t5_cfg = transformers.T5Config(**arch_kwargs(arch["text_encoder_2"]))
    with torch.device(device):
        clip = transformers.CLIPTextModel(clip_cfg).to(dtype).eval().requires_grad_(False)
        t5 = transformers.T5EncoderModel(t5_cfg).to(dtype).eval().requires_grad_(False)
    return (transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer")), clip,
            transformers.T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2")), t5)


@torch.no_grad()
def bench_end_to_end(model: str = "flux.1-dev", height: int = 1024, width: int = 1024, steps: int = 28,
                     quantization: str | None = None, reps: int = 3, device: str = "cuda",
                     compile: bool = True) -> dict:
    import diffusers

    from ditserve.accel import accelerate_dit
    from ditserve.encoders.text import ClipPooledEncoder, T5SequenceEncoder
    from ditserve.pipelines.base import RunControl
    from ditserve.pipelines.flux import FluxPipeline
    from ditserve.sampling.flow_match import FlowMatchConfig

    dtype = torch.bfloat16
    arch = architectures()[model]
    ref_dit, ours_dit = build(model, device, dtype)
    folder = Path(tempfile.mkdtemp())
    clip_tok, clip, t5_tok, t5 = _random_encoders(arch, folder, device, dtype)
    with torch.device(device):
        vae = diffusers.AutoencoderKL(**arch_kwargs(arch["vae"])).to(dtype).eval().requires_grad_(False)
    sched_kw = arch_kwargs(arch["scheduler"])
    ref = diffusers.FluxPipeline(diffusers.FlowMatchEulerDiscreteScheduler(**sched_kw), vae, clip, clip_tok,
                                 t5, t5_tok, ref_dit)
    ref.set_progress_bar_config(disable=True)
    ours = FluxPipeline(ours_dit, ClipPooledEncoder(clip_tok, clip), T5SequenceEncoder(t5_tok, t5), vae,
                        FlowMatchConfig(**sched_kw), torch.device(device), dtype)
    guidance = 3.5 if arch["transformer"].get("guidance_embeds") else 0.0
    req = GenerationRequest(prompt=PROMPT, height=height, width=width, num_inference_steps=steps,
                            guidance_scale=guidance, true_cfg_scale=1.0, seed=0, max_sequence_length=512)

    def run_ref():
        return ref(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    row = base_row(model, "bfloat16", f"{width}x{height}, {steps} steps")
    run_ref()  # warm-up: cuDNN plans, allocator
    row["diffusers_eager_e2e_s"], ref_img = wall_time(run_ref, reps)
    ours.dit = accelerate_dit(ours_dit, AccelConfig(compile=compile), torch.device(device))
    ours.run([req], RunControl())  # warm-up: compile and capture
    row["ditserve_e2e_s"], (pixels, timings) = wall_time(lambda: ours.run([req], RunControl()), reps)
    row["ditserve_stages_s"] = dict(timings.stages)
    row["ditserve_peak_memory_gib"] = timings.peak_memory_gib  # per stage (GPU)
    row["ditserve_mean_step_s"] = statistics.median(timings.steps)
    ref_u8 = (ref_img * 255).round().astype("uint8")
    row["psnr_ditserve_vs_diffusers_db"] = psnr(pixels.images, ref_u8)
    row["speedup_vs_diffusers_eager"] = row["diffusers_eager_e2e_s"] / row["ditserve_e2e_s"]
    log.info("e2e so far: %s", row)

    if compile:
        ref.transformer.compile_repeated_blocks(fullgraph=True)
        run_ref()
        row["diffusers_compiled_e2e_s"], _ = wall_time(run_ref, reps)
        row["speedup_vs_diffusers_compiled"] = row["diffusers_compiled_e2e_s"] / row["ditserve_e2e_s"]
    if quantization == "fp8":
        ours.dit = ref.transformer = None
        del ref, ref_dit, ours_dit
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        _, fresh = build(model, device, dtype)  # same seed, same weights as the bf16 run
        ours.dit = accelerate_dit(fresh, AccelConfig(compile=compile, quantization="fp8"), torch.device(device))
        ours.run([req], RunControl())
        row["ditserve_fp8_e2e_s"], (pixels8, timings8) = wall_time(lambda: ours.run([req], RunControl()), reps)
        row["ditserve_fp8_mean_step_s"] = statistics.median(timings8.steps)
        row["fp8_psnr_vs_bf16_db"] = psnr(pixels8.images, pixels.images)
    return row
