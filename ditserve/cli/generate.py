"""`ditserve generate`: one request from the command line, images or videos to files."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ditserve.api import GenerationRequest, InvalidRequest

log = logging.getLogger(__name__)

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".png")  # .png: numbered lossless frames


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by generate and serve."""
    p.add_argument("--model-path", default=None,
                   help="diffusers model directory or Hugging Face id (default: the bundled demo model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--enable-torch-compile", action="store_true",
                   help="compile the DiT per block (and replay steps as CUDA graphs on GPU); warms up at start")
    p.add_argument("--quantization", default=None, choices=["fp8"],
                   help="fp8: e4m3 linear layers through torch._scaled_mm (CUDA)")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "fa3", "sage"],
                   help="auto/sdpa: torch SDPA (cuDNN on Hopper); fa3, sage: when installed (CUDA)")


def accel_config(args: argparse.Namespace):
    from ditserve.config import AccelConfig

    return AccelConfig(compile=args.enable_torch_compile, quantization=args.quantization,
                       attention=args.attention_backend)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate images or videos from a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-inference-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--true-cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=None)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image (PNG, JPEG, WebP): to edit, or to animate with an image-to-video model; "
                        "repeatable for models that take several")
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames (4k+1 for Wan; default 81)")
    p.add_argument("--fps", type=int, default=None, help="video models: frame rate of the file (default 16)")
    p.add_argument("--guidance-scale-2", type=float, default=None,
                   help="guidance of the second (low-noise) expert, Wan 2.2 A14B (default: --guidance-scale)")
    p.add_argument("--sampler", default=None, choices=["euler", "unipc", "dpm++"],
                   help="solver override (default: the model folder's scheduler)")
    p.add_argument("--flow-shift", type=float, default=None, help="flow-matching shift override (static)")
    p.add_argument("--output", default=None,
                   help="image file (.png, .jpg, .webp; default output.png) or, for a video model, video file "
                        "(.mp4 H.264, .webm VP9, .gif, or .png for numbered frames; default output.mp4); "
                        "several outputs get _0, _1, ... suffixes")
    p.add_argument("--perf-dump-path", default=None, help="write stage and step times as JSON here")
    p.set_defaults(run=run)


def default_model_path(given: str | None) -> str:
    """`--model-path` if given, else $DITSERVE_DEFAULT_MODEL, else the bundled demo model."""
    from ditserve import demo
    from ditserve.config import env

    if given:
        return given
    override = env.demo_model_path()
    if override:
        return override
    bundled = demo.model_path()
    if bundled is None:
        raise InvalidRequest("--model-path is required (the bundled demo model is not installed)", "model")
    log.info("no --model-path: using the bundled demo model (64x64 shapes; try %r)", demo.EXAMPLE_PROMPT)
    return str(bundled)


def output_paths(output: str, n: int, video: bool = False) -> list[Path]:
    path = Path(output)
    allowed = VIDEO_SUFFIXES if video else tuple(IMAGE_FORMATS)
    if path.suffix.lower() not in allowed:
        kind = "a video model's output" if video else "output"
        raise InvalidRequest(f"{kind} {output} must end in one of {', '.join(allowed)}", "output")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def read_image_file(path: str, limits):
    """`--image PATH` decoded to RGB, or InvalidRequest (missing, unreadable, corrupt, too large)."""
    from ditserve.api.images import read_image

    file = Path(path)
    if not file.is_file():
        raise InvalidRequest(f"--image {path} {'is a directory' if file.is_dir() else 'does not exist'}", "image")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"--image {path} cannot be read ({exc.strerror})", "image") from None
    return read_image(data, f"--image {path}", limits)


def check_writable(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidRequest(f"{flag} {path} is a directory", flag)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise InvalidRequest(f"{flag} {path} is not writable (no such directory or no permission)", flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidRequest(f"{flag} {path} is not writable", flag)


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before any weights load.
    from ditserve.runtime.loader import inspect_model

    source = inspect_model(default_model_path(args.model_path))
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale, seed=args.seed, num_images=args.num_images,
        max_sequence_length=args.max_sequence_length,
        images=tuple(read_image_file(path, source.limits) for path in args.image),
        num_frames=args.num_frames, fps=args.fps, guidance_scale_2=args.guidance_scale_2,
        sampler=args.sampler, flow_shift=args.flow_shift,
    ).resolve(source.defaults, source.limits)
    video = bool(source.limits.frame_multiple)
    paths = output_paths(args.output or ("output.mp4" if video else "output.png"), request.num_images, video)
    for path in paths:
        check_writable(path, "--output")
    if args.perf_dump_path:
        check_writable(Path(args.perf_dump_path), "--perf-dump-path")

    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.pipelines.base import RunControl
    from ditserve.runtime.engine import Engine

    config = EngineConfig(ModelConfig(str(source.path), args.device, args.dtype), accel=accel_config(args))
    engine = Engine.from_config(config, source, warmup=[request])  # compile for this request's shape
    out = engine.run_batch([request], RunControl(progress_bar=True))[0]
    for image, path in zip(out.images, paths):
        image.save(path, format=IMAGE_FORMATS[path.suffix.lower()])
        log.info("wrote %s", path)
    if out.videos:
        from ditserve.runtime.video_io import write_video

        for frames, path in zip(out.videos, paths):
            written = write_video(frames, path, out.fps)
            log.info("wrote %s (%d frames, %dx%d, %d fps)", path if len(written) == 1 else f"{len(written)} frames "
                     f"{written[0]}..", len(frames), frames.shape[2], frames.shape[1], out.fps)
    if args.perf_dump_path:
        described = {**request.__dict__, "images": [f"{im.width}x{im.height}" for im in request.images]}
        dump = {"model": str(source.path), "request": described, **out.timings.to_dict()}
        Path(args.perf_dump_path).write_text(json.dumps(dump, indent=2))
    log.info("seed %d, total %.3f s", out.seed, out.timings.total_s)
    return 0
