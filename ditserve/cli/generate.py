"""`ditserve generate`: one request from the command line, images or videos to files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ditserve.api import GenerationRequest, InvalidRequest

log = logging.getLogger(__name__)

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".png")  # .png: numbered lossless frames
ALPHA_SUFFIXES = (".png", ".webp")  # image formats that keep an alpha channel (layered models' RGBA)


def add_parser(sub) -> None:
    from ditserve.cli.engine_args import add_engine_args
    from ditserve.cli.main import add_log_level_arg

    p = sub.add_parser("generate", help="generate images or videos from a prompt",
                       description="Generate images or videos from a prompt. Unset options take the model's "
                                   "defaults (its diffusers pipeline's, or its folder's ditserve.json).")
    add_engine_args(p)
    p.add_argument("--prompt", metavar="TEXT", required=True, help="what to draw")
    p.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="what to steer away from, through true CFG (default: none; Wan: \"\")")
    p.add_argument("--height", metavar="H", type=int, default=None,
                   help="pixels, a multiple of 16 (default: the model's: FLUX, Qwen-Image 1024, Wan 480, demo 64)")
    p.add_argument("--width", metavar="W", type=int, default=None,
                   help="pixels, a multiple of 16 (default: the model's: FLUX, Qwen-Image 1024, Wan 832, demo 64)")
    p.add_argument("--num-inference-steps", metavar="N", type=int, default=None,
                   help="denoising steps (default: the model's: FLUX 28, Qwen-Image 50, Wan 50, demo 20)")
    p.add_argument("--guidance-scale", metavar="G", type=float, default=None,
                   help="FLUX-dev: embedded guidance; Wan, SD3: CFG scale (default: the model's: FLUX 3.5, Wan 5.0, "
                        "SD3 7.0, demo 0)")
    p.add_argument("--true-cfg-scale", metavar="G", type=float, default=None,
                   help="true CFG with --negative-prompt (default: the model's: FLUX 1.0 = off, Qwen-Image 4.0)")
    p.add_argument("--seed", metavar="S", type=int, default=None,
                   help="noise seed, drawn as diffusers draws it (default: a random one, reported)")
    p.add_argument("--num-images", metavar="N", type=int, default=1,
                   help="images from one batch; their noise comes from one generator seeded with --seed, as in "
                        "diffusers, so image k is not what --seed S+k gives alone")
    p.add_argument("--max-sequence-length", metavar="N", type=int, default=None,
                   help="text tokens (default: the model's: 512, SD3 256, demo 16)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="input image (PNG, JPEG, WebP): to edit, or to animate with an image-to-video model; "
                        "repeatable for models that take several (default: none)")
    p.add_argument("--num-frames", metavar="N", type=int, default=None,
                   help="video models: frames, 4k+1 (default: Wan 81, video demo 17); without --model-path, "
                        "asks for the bundled video demo")
    p.add_argument("--fps", metavar="FPS", type=int, default=None,
                   help="video models: frame rate of the file (default: Wan 16, TI2V-5B 24)")
    p.add_argument("--guidance-scale-2", metavar="G", type=float, default=None,
                   help="guidance of the second (low-noise) expert, Wan 2.2 A14B (default: --guidance-scale)")
    p.add_argument("--sampler", default=None, choices=["euler", "unipc", "dpm++"],
                   help="solver override (default: the model folder's scheduler)")
    p.add_argument("--flow-shift", metavar="F", type=float, default=None,
                   help="flow-matching shift override, static (default: the model folder's scheduler)")
    p.add_argument("--skip-guidance-layers", metavar="I,J,...", type=_layer_list, default=None,
                   help="SD3 with CFG: skip-layer guidance over these blocks, e.g. 7,8,9 for SD3.5-Medium (default: off)")
    p.add_argument("--skip-layer-guidance-scale", metavar="S", type=float, default=None,
                   help="skip-layer guidance strength (default: 2.8, as diffusers)")
    p.add_argument("--skip-layer-guidance-start", metavar="F", type=float, default=None,
                   help="fraction of the steps where skip-layer guidance starts (default: 0.01)")
    p.add_argument("--skip-layer-guidance-stop", metavar="F", type=float, default=None,
                   help="fraction of the steps where skip-layer guidance stops (default: 0.2)")
    p.add_argument("--use-dynamic-cfg", action=argparse.BooleanOptionalAction, default=None,
                   help="CogVideoX: guidance that grows over the run, as diffusers' use_dynamic_cfg "
                        "(default: the model's, off)")
    p.add_argument("--layers", metavar="N", type=int, default=None,
                   help="Qwen-Image-Layered: RGBA layers to split the --image into, one PNG each (default: 4)")
    p.add_argument("--output", metavar="FILE", default=None,
                   help="image file (.png, .jpg, .webp; default output.png) or, for a video model, video file "
                        "(.mp4 H.264, .webm VP9, .gif, or .png for numbered frames; default output.mp4); "
                        "several outputs get _0, _1, ... suffixes")
    p.add_argument("--perf-dump-path", metavar="FILE", default=None,
                   help="write stage and step times, seeds and output files as JSON here (default: none)")
    add_log_level_arg(p)
    p.set_defaults(run=run)


def _layer_list(text: str) -> tuple[int, ...]:
    """"7,8,9" -> (7, 8, 9) for --skip-guidance-layers."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 7,8,9, got {text!r}") from None


def default_model_path(given: str | None, video: bool = False) -> str:
    """`--model-path` if given, else $DITSERVE_DEFAULT_MODEL, else the bundled demo model (the video
    demo when `video`: the request gives --num-frames)."""
    from ditserve import demo

    path = demo.default_model(given, video=video)
    if not given and demo.is_demo(path):
        log.info("no --model-path: using the bundled demo model (64x64 shapes; try %r)", demo.EXAMPLE_PROMPT)
    elif not given and demo.is_video_demo(path):
        log.info("no --model-path: using the bundled video demo model (64x64, 17 frames of a moving shape; try %r)",
                 demo.VIDEO_EXAMPLE_PROMPT)
    return path


def output_paths(output: str, n: int, video: bool = False, layers: int = 0) -> list[Path]:
    """One file per output; a layered model's RGBA layers as `out_layer0.png`, ... (`out_0_layer0.png`
    with several images), in PNG or WebP, which keep the alpha channel."""
    path = Path(output)
    allowed = VIDEO_SUFFIXES if video else tuple(s for s in IMAGE_FORMATS if not layers or s in ALPHA_SUFFIXES)
    if path.suffix.lower() not in allowed:
        kind = "a video model's output" if video else "a layered model's output" if layers else "output"
        raise InvalidRequest(f"{kind} {output} must end in one of {', '.join(allowed)}", "output")
    stems = [path.stem] if n == 1 else [f"{path.stem}_{i}" for i in range(n)]
    if layers:
        stems = [f"{stem}_layer{k}" for stem in stems for k in range(layers)]
    return [path] if stems == [path.stem] else [path.with_name(stem + path.suffix) for stem in stems]


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
    start = time.perf_counter()
    # Everything a user can get wrong is checked before any weights load.
    from ditserve.runtime.loader import inspect_model

    source = inspect_model(default_model_path(args.model_path, video=args.num_frames is not None))
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale, seed=args.seed, num_images=args.num_images,
        max_sequence_length=args.max_sequence_length,
        images=tuple(read_image_file(path, source.limits) for path in args.image),
        num_frames=args.num_frames, fps=args.fps, guidance_scale_2=args.guidance_scale_2,
        sampler=args.sampler, flow_shift=args.flow_shift, skip_guidance_layers=args.skip_guidance_layers,
        skip_layer_guidance_scale=args.skip_layer_guidance_scale,
        skip_layer_guidance_start=args.skip_layer_guidance_start,
        skip_layer_guidance_stop=args.skip_layer_guidance_stop, layers=args.layers,
        use_dynamic_cfg=args.use_dynamic_cfg,
    ).resolve(source.defaults, source.limits)
    video = bool(source.limits.frame_multiple)
    paths = output_paths(args.output or ("output.mp4" if video else "output.png"), request.num_images, video,
                         layers=request.layers or 0)
    for path in paths:
        check_writable(path, "--output")
    if args.perf_dump_path:
        check_writable(Path(args.perf_dump_path), "--perf-dump-path")
    _warn_if_demo_cannot_draw(source.path, request)

    from ditserve.cli.engine_args import engine_config
    from ditserve.pipelines.base import RunControl
    from ditserve.runtime.engine import Engine

    if args.log_level != "debug":
        quiet_libraries()
    config = engine_config(args, str(source.path))
    from ditserve.runtime.fit import warn_if_too_big

    warn_if_too_big(config, source.path)  # one line naming the flag that helps (CUDA only)
    engine = Engine.from_config(config, source, warmup=[request])  # compile for this request's shape
    # a bar only where a person watches; captured stderr (CI, scripts) would get carriage-return noise
    bar = sys.stderr.isatty() and args.log_level in ("debug", "info")
    out = engine.run_batch([request], RunControl(progress_bar=bar))[0]
    written = _write_outputs(out, paths)
    outputs = describe_outputs(written, out.seed, request.num_images)
    if args.perf_dump_path:
        described = {**request.__dict__, "images": [f"{im.width}x{im.height}" for im in request.images]}
        dump = {"model": str(source.path), "request": described, "seed": out.seed, "outputs": outputs,
                **out.timings.to_dict()}
        Path(args.perf_dump_path).write_text(json.dumps(dump, indent=2))
    _log_result(outputs, request, out, time.perf_counter() - start)
    return 0


def quiet_libraries() -> None:
    """Turn off transformers' and diffusers' weight-loading progress bars (the libraries' warnings
    still show). Hugging Face Hub's download bars stay: a first download can take minutes."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def _warn_if_demo_cannot_draw(model: Path, request: GenerationRequest) -> None:
    from ditserve import demo

    warning = demo.warning_for(model, request.prompt, request.height, request.width, request.num_frames)
    if warning:
        log.warning(warning)


def _write_outputs(out, paths: list[Path]) -> list[tuple[Path, str]]:
    """Save images or videos; (path, what it holds) for each."""
    written = []
    for image, path in zip(out.images, paths):
        image.save(path, format=IMAGE_FORMATS[path.suffix.lower()])
        written.append((path, f"{image.width}x{image.height}"))
    if out.videos:
        from ditserve.runtime.video_io import write_video

        for frames, path in zip(out.videos, paths):
            files = write_video(frames, path, out.fps)
            what = f"{len(frames)} frames, {frames.shape[2]}x{frames.shape[1]}, {out.fps} fps"
            if len(files) > 1:
                what += f", as {files[0].name}..{files[-1].name}"
            written.append((path, what))
    return written


def describe_outputs(written: list[tuple[Path, str]], seed: int, num_images: int) -> list[dict]:
    """Per output: file, seed, place in the batch and the flags that give it again. The batch's noise
    comes from one generator seeded with `seed` (diffusers' semantics), so output k is reproduced by
    the same seed and batch size, not by seed + k."""
    flags = _seed_flags(seed, num_images)
    per = max(1, len(written) // num_images)  # a layered model writes several RGBA layers per image
    return [{"path": str(path), "content": what, "seed": seed, "index": i // per, "num_images": num_images,
             **({"layer": i % per} if per > 1 else {}),
             "reproduce": flags + (f" (output {i // per + 1} of {num_images})" if num_images > 1 else "")}
            for i, (path, what) in enumerate(written)]


def _seed_flags(seed: int, num_images: int) -> str:
    return f"--seed {seed}" + (f" --num-images {num_images}" if num_images > 1 else "")


def _log_result(outputs: list[dict], request: GenerationRequest, out, wall_s: float) -> None:
    """The command's result on stderr: each file with its seed, then the time."""
    took = f"{out.timings.total_s:.2f} s generating, {wall_s:.1f} s with loading"
    if len(outputs) == 1:
        only = outputs[0]
        log.info("wrote %s (%s, seed %d) in %s", only["path"], only["content"], only["seed"], took)
        return
    for o in outputs:
        layer = f", layer {o['layer'] + 1} of {len(outputs) // o['num_images']}" if "layer" in o else ""
        log.info("wrote %s (%s, seed %d, image %d of %d%s; again: %s)", o["path"], o["content"], o["seed"],
                 o["index"] + 1, o["num_images"], layer, _seed_flags(o["seed"], o["num_images"]))
    if request.num_images == 1:  # one image's layers
        log.info("%d outputs in %s", len(outputs), took)
        return
    log.info("%d outputs in %s; their noise is one draw from seed %d, as in diffusers, so output 2 is not "
             "what --seed %d gives alone", len(outputs), took, request.seed, request.seed + 1)
