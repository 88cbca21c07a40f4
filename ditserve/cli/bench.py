"""`ditserve bench`: time ditserve against diffusers on this GPU with random weights at real size."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ditserve.api import InvalidRequest

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a DiT step (and end to end) against diffusers on a GPU",
                       description="Time ditserve against diffusers on this CUDA GPU with random weights at real "
                                   "size; prints JSON rows.")
    p.add_argument("--model", default="flux.1-dev",
                   help="flux.1-dev, flux.1-schnell, qwen-image, wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-ti2v-5b, "
                        "sd3.5-large, sd3.5-medium, cogvideox-5b or hunyuanvideo "
                        "(shapes in ditserve/bench/architectures.json)")
    p.add_argument("--height", type=int, default=None,
                   help="default: 1024 (FLUX, SD3.5), 1328 (Qwen-Image), 480 (Wan, CogVideoX)")
    p.add_argument("--width", type=int, default=None,
                   help="default: 1024 (FLUX, SD3.5), 1328 (Qwen-Image), 832 (Wan), 720 (CogVideoX)")
    p.add_argument("--num-frames", type=int, default=None, help="video frames (default: Wan 81, CogVideoX 49)")
    p.add_argument("--vae", action="store_true", help="Wan: also time the VAE decode (whole and tiled)")
    p.add_argument("--reps", type=int, default=10, help="Wan: timed repetitions of the compiled step (eager: half)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps for --end-to-end (default: FLUX 28, Wan 10 of its 50)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16"], help="weights and activations")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: also time e4m3 linear layers (every family's step; FLUX end to end) (default: none)")
    p.add_argument("--compare", default="diffusers", choices=["diffusers", "none"],
                   help="time diffusers eager and compiled on the same weights, or ditserve alone")
    p.add_argument("--end-to-end", action="store_true", help="time all stages, ditserve vs diffusers")
    p.add_argument("--no-fused-kernels", dest="fused_kernels", action="store_false",
                   help="FLUX step: without the Triton QK-norm + RoPE and fp8 quantisation kernels")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "fa3", "sage", "fp8"],
                   help="DiT step benches: also time the compiled step with this attention, with fp8 linears "
                        "under --quantization fp8 (fa3, sage: when installed; fp8: cuDNN fp8 SDPA, Hopper)")
    p.add_argument("--json", default=None, help="append the result row(s) to this JSON file (default: stdout only)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ditserve.bench.common import architectures

    if args.model not in architectures() or args.model.startswith("_"):
        names = [k for k in architectures() if not k.startswith("_")]
        raise InvalidRequest(f"unknown model {args.model!r}; known: {', '.join(names)}", "model")
    if not args.model.startswith(("flux", "qwen-image", "wan", "sd3", "cogvideox", "hunyuanvideo")):
        raise InvalidRequest(f"bench supports the flux.1, qwen-image, wan, sd3.5, cogvideox and hunyuanvideo models "
                             f"so far, not {args.model}", "model")
    if args.model.startswith("hunyuanvideo") and (args.end_to_end or args.vae):
        raise InvalidRequest("bench for hunyuanvideo times the DiT step only (no --end-to-end or --vae yet)", "model")
    if args.model.startswith("cogvideox") and (args.end_to_end or args.vae):
        raise InvalidRequest("bench for cogvideox times the DiT step only (no --end-to-end or --vae yet)", "model")
    if args.model.startswith("sd3") and args.end_to_end:
        raise InvalidRequest("bench for sd3.5 times the DiT step only (no --end-to-end yet)", "model")
    qwen = args.model.startswith("qwen-image")
    if qwen and args.end_to_end:
        raise InvalidRequest("bench for qwen-image times the DiT step only (no --end-to-end yet)", "model")
    if args.model.startswith("flux") and args.attention_backend != "auto" and not args.quantization:
        raise InvalidRequest("the FLUX step bench times --attention-backend with fp8 linears: add --quantization fp8",
                             "attention_backend")
    if args.end_to_end and args.attention_backend != "auto" and not args.model.startswith("wan"):
        raise InvalidRequest("--attention-backend applies to the DiT step bench (and Wan's --end-to-end)",
                             "attention_backend")
    if not torch.cuda.is_available():
        raise InvalidRequest("ditserve bench needs a CUDA GPU", "device")
    if args.model.startswith("wan") and args.end_to_end:
        from ditserve.bench.wan_e2e import bench_end_to_end as wan_end_to_end

        return _write([wan_end_to_end(args.model, args.height, args.width, args.num_frames, args.steps,
                                      args.quantization, attention=args.attention_backend)], args.json)
    if args.model.startswith("wan"):
        from ditserve.bench.wan import bench_step as wan_bench_step
        from ditserve.bench.wan import bench_vae_decode, default_size

        height, width, frames = default_size(args.model)
        height, width, frames = args.height or height, args.width or width, args.num_frames or frames
        rows = [wan_bench_step(args.model, height, width, frames, args.quantization,
                               compare=args.compare == "diffusers", reps=args.reps, attention=args.attention_backend)]
        if args.vae:
            rows.append(bench_vae_decode(height, width, frames, model=args.model))
        return _write(rows, args.json)
    if args.model.startswith("hunyuanvideo"):
        from ditserve.bench.hunyuan_video import bench_step as hunyuan_video_bench_step

        return _write([hunyuan_video_bench_step(args.model, args.height or 720, args.width or 1280,
                                                args.num_frames or 129, args.quantization,
                                                compare=args.compare == "diffusers",
                                                attention=args.attention_backend)], args.json)
    if args.model.startswith("cogvideox"):
        from ditserve.bench.cogvideox import bench_step as cogvideox_bench_step

        return _write([cogvideox_bench_step(args.model, args.height or 480, args.width or 720, args.num_frames or 49,
                                            args.quantization, compare=args.compare == "diffusers",
                                            attention=args.attention_backend)], args.json)
    height, width = args.height or (1328 if qwen else 1024), args.width or (1328 if qwen else 1024)
    if args.model.startswith("sd3"):
        from ditserve.bench.sd3 import bench_step as sd3_bench_step

        row = sd3_bench_step(args.model, height, width, quantization=args.quantization,
                             compare=args.compare == "diffusers", attention=args.attention_backend)
    elif qwen:
        from ditserve.bench.qwen_image import bench_step as qwen_bench_step

        row = qwen_bench_step(args.model, height, width, quantization=args.quantization,
                              compare=args.compare == "diffusers", attention=args.attention_backend)
    elif args.end_to_end:
        from ditserve.bench.flux_e2e import bench_end_to_end

        row = bench_end_to_end(args.model, height, width, args.steps or 28, args.quantization)
    else:
        from ditserve.bench.flux import bench_step

        row = bench_step(args.model, height, width, quantization=args.quantization,
                         compare=args.compare == "diffusers", fused_kernels=args.fused_kernels,
                         attention=args.attention_backend)
    return _write([row], args.json)


def _write(rows: list[dict], json_path: str | None) -> int:
    for row in rows:
        sys.stdout.write(json.dumps(row, indent=2) + "\n")  # the result is the output
    if json_path:
        path = Path(json_path)
        old = json.loads(path.read_text()) if path.exists() else []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old + rows, indent=2))
    return 0
