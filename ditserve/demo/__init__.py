"""The bundled demo models: tiny models that draw one shape on a flat background, as an image or moving.

* The image demo (`MODEL_DIR`, served as "ditserve-demo"): a tiny FLUX-architecture model, what
  `ditserve generate`, `ditserve serve` and `Generator.from_pretrained()` use when no model is given.
  It knows prompts of the form ``a {color} {shape} on the {position}, {background} background`` at
  64x64 and nothing else (`request_warning` says when a request is outside that); `training/demo`
  in the repository trains it.
* The video demo (`VIDEO_MODEL_DIR`, "ditserve-demo-video"): a tiny Wan 2.1-architecture
  text-to-video model, what `ditserve generate --num-frames N` uses when no model is given, and
  `Generator.from_pretrained("ditserve-demo-video")` loads. It knows ``a {color} {shape} moving
  {direction}, {background} background`` at 64x64, 17 frames, 8 fps (`video_request_warning`);
  `training/video_demo` trains it.

Both names work wherever a model path is taken (`--model-path ditserve-demo-video`). Each folder is a
diffusers pipeline directory (`FluxPipeline`, `WanPipeline`) that diffusers loads as well. So ditserve
works with no download and no network.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
VIDEO_MODEL_DIR = Path(__file__).resolve().parent / "video_model"
IMAGE_NAME, VIDEO_NAME = "ditserve-demo", "ditserve-demo-video"  # what the demos are served and loaded as
EXAMPLE_PROMPT = "a red circle on the left, blue background"
VIDEO_EXAMPLE_PROMPT = "a red circle moving right, blue background"
SIZE = 64  # height and width both were trained at
VIDEO_FRAMES, VIDEO_FPS = 17, 8

# The vocabulary it was trained on (training/demo/scenes.py; CSS named colors).
COLORS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
DIRECTIONS = ("left", "right", "up", "down")  # the video demo's (training/video_demo/scenes.py)
FORM = "a {color} {shape} on the {position}, {background} background"
VIDEO_FORM = "a {color} {shape} moving {direction}, {background} background"
# Trained variants: "an" before a vowel, a capital first letter.
_FORM_RE = re.compile(r"an? (\w+) (\w+) on the (\w+), (\w+) background", re.IGNORECASE)
_VIDEO_FORM_RE = re.compile(r"an? (\w+) (\w+) moving (\w+), (\w+) background", re.IGNORECASE)
_KNOWN_WORDS = {"a", "an", "on", "the", "background", *COLORS, *SHAPES, *POSITIONS}
_VIDEO_KNOWN_WORDS = {"a", "an", "moving", "background", *COLORS, *SHAPES, *DIRECTIONS}


def model_path() -> Path | None:
    """The bundled model's folder, or None when this installation lacks it."""
    return MODEL_DIR if (MODEL_DIR / "model_index.json").is_file() else None


def video_model_path() -> Path | None:
    """The bundled video demo's folder, or None when this installation lacks it."""
    return VIDEO_MODEL_DIR if (VIDEO_MODEL_DIR / "model_index.json").is_file() else None


def is_demo(path: str | Path) -> bool:
    """Whether `path` is the bundled (image) demo model's folder."""
    return _same(path, MODEL_DIR)


def is_video_demo(path: str | Path) -> bool:
    """Whether `path` is the bundled video demo model's folder."""
    return _same(path, VIDEO_MODEL_DIR)


def _same(path: str | Path, folder: Path) -> bool:
    try:
        return Path(path).resolve() == folder
    except OSError:
        return False


def prompt_problem(prompt: str) -> str | None:
    """What in `prompt` the demo model does not know, or None for a prompt of its form."""
    return _prompt_problem(prompt, _FORM_RE, _KNOWN_WORDS, POSITIONS)


def video_prompt_problem(prompt: str) -> str | None:
    """What in `prompt` the video demo model does not know, or None for a prompt of its form."""
    return _prompt_problem(prompt, _VIDEO_FORM_RE, _VIDEO_KNOWN_WORDS, DIRECTIONS)


def _prompt_problem(prompt: str, form: re.Pattern, known_words: set[str], places: tuple[str, ...]) -> str | None:
    match = form.fullmatch(prompt.strip())
    if match is None:
        unknown = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in known_words})
        words = f" (unknown words: {', '.join(unknown)})" if unknown else ""
        return f"the prompt {prompt!r} is not of that form{words}"
    color, shape, place, background = (word.lower() for word in match.groups())
    unknown = [w for w, known in ((color, COLORS), (shape, SHAPES), (place, places), (background, COLORS))
               if w not in known]
    if unknown:
        return f"the prompt {prompt!r} has unknown words: {', '.join(unknown)}"
    if color == background:
        return f"the prompt {prompt!r} asks for a {color} shape on a {background} background"
    return None


def request_warning(prompt: str, height: int, width: int) -> str | None:
    """One line for a request the demo model cannot draw (size or prompt outside what it knows), else None."""
    problems = [] if (height, width) == (SIZE, SIZE) else [f"{width}x{height} is not {SIZE}x{SIZE}"]
    problem = prompt_problem(prompt)
    if problem:
        problems.append(problem)
    if not problems:
        return None
    return (f"the demo model draws {SIZE}x{SIZE} images of one shape on a flat background, for prompts "
            f"'{FORM}' (colors {', '.join(COLORS)}; shapes {', '.join(SHAPES)}; positions "
            f"{', '.join(POSITIONS)}) and nothing else: {'; '.join(problems)}, so expect a meaningless "
            f"picture (try {EXAMPLE_PROMPT!r}; anything else needs a real model)")


def video_request_warning(prompt: str, height: int, width: int, num_frames: int | None) -> str | None:
    """One line for a request the video demo cannot make (size, length or prompt outside what it
    knows), else None."""
    problems = [] if (height, width) == (SIZE, SIZE) else [f"{width}x{height} is not {SIZE}x{SIZE}"]
    if num_frames is not None and num_frames != VIDEO_FRAMES:
        problems.append(f"{num_frames} frames is not {VIDEO_FRAMES}")
    problem = video_prompt_problem(prompt)
    if problem:
        problems.append(problem)
    if not problems:
        return None
    return (f"the video demo model makes {SIZE}x{SIZE}, {VIDEO_FRAMES}-frame clips of one shape moving across a "
            f"flat background, for prompts '{VIDEO_FORM}' (colors {', '.join(COLORS)}; shapes "
            f"{', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)}) and nothing else: {'; '.join(problems)}, "
            f"so expect a meaningless clip (try {VIDEO_EXAMPLE_PROMPT!r}; anything else needs a real model)")


def warning_for(path: str | Path, prompt: str, height: int, width: int, num_frames: int | None = None) -> str | None:
    """The demo warning for a request to the model at `path`: None unless it is a bundled demo and
    the request is outside what that demo knows."""
    if is_demo(path):
        return request_warning(prompt, height, width)
    if is_video_demo(path):
        return video_request_warning(prompt, height, width, num_frames)
    return None


def resolve_name(given: str | Path | None) -> str | Path | None:
    """`given`, or a bundled demo's folder when `given` is its name ("ditserve-demo",
    "ditserve-demo-video") and no such local path exists."""
    from ditserve.api import InvalidRequest

    if given is None or str(given) not in (IMAGE_NAME, VIDEO_NAME) or Path(given).exists():
        return given
    bundled = model_path() if str(given) == IMAGE_NAME else video_model_path()
    if bundled is None:
        raise InvalidRequest(f"the bundled demo model {given!r} is not installed", "model")
    return str(bundled)


def default_model(given: str | Path | None = None, video: bool = False) -> str:
    """`given` if set (a demo's name: its folder), else $DITSERVE_DEFAULT_MODEL, else the bundled demo
    model's folder: the video demo's when `video` (the request asks for frames), else the image demo's."""
    from ditserve.api import InvalidRequest
    from ditserve.config import env

    if given:
        return str(resolve_name(given))
    override = env.demo_model_path()
    if override:
        return override
    bundled = video_model_path() if video else model_path()
    if bundled is None:
        what = "video demo model" if video else "demo model"
        raise InvalidRequest(f"a model path is required (the bundled {what} is not installed)", "model")
    return str(bundled)
