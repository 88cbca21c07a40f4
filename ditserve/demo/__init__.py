"""The bundled demo model: a tiny FLUX-architecture model that draws one shape on a flat background.

It is what `ditserve generate`, `ditserve serve` and `Generator.from_pretrained()` use when no model is
given, so ditserve works with no download and no network. It knows prompts of the form ``a {color}
{shape} on the {position}, {background} background`` at 64x64 and nothing else (`request_warning`
says when a request is outside that); `training/demo` in the repository trains it. `MODEL_DIR` is its
folder, a diffusers `FluxPipeline` directory that diffusers loads as well.
"""

from __future__ import annotations

import re
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
EXAMPLE_PROMPT = "a red circle on the left, blue background"
SIZE = 64  # height and width it was trained at

# The vocabulary it was trained on (training/demo/scenes.py; CSS named colors).
COLORS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
FORM = "a {color} {shape} on the {position}, {background} background"
# Trained variants: "an" before a vowel, a capital first letter.
_FORM_RE = re.compile(r"an? (\w+) (\w+) on the (\w+), (\w+) background", re.IGNORECASE)
_KNOWN_WORDS = {"a", "an", "on", "the", "background", *COLORS, *SHAPES, *POSITIONS}


def model_path() -> Path | None:
    """The bundled model's folder, or None when this installation lacks it."""
    return MODEL_DIR if (MODEL_DIR / "model_index.json").is_file() else None


def is_demo(path: str | Path) -> bool:
    """Whether `path` is the bundled demo model's folder."""
    try:
        return Path(path).resolve() == MODEL_DIR
    except OSError:
        return False


def prompt_problem(prompt: str) -> str | None:
    """What in `prompt` the demo model does not know, or None for a prompt of its form."""
    match = _FORM_RE.fullmatch(prompt.strip())
    if match is None:
        unknown = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in _KNOWN_WORDS})
        words = f" (unknown words: {', '.join(unknown)})" if unknown else ""
        return f"the prompt {prompt!r} is not of that form{words}"
    color, shape, position, background = (word.lower() for word in match.groups())
    unknown = [w for w, known in ((color, COLORS), (shape, SHAPES), (position, POSITIONS), (background, COLORS))
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


def default_model(given: str | Path | None = None) -> str:
    """`given` if set, else $DITSERVE_DEFAULT_MODEL, else the bundled demo model's folder."""
    from ditserve.api import InvalidRequest
    from ditserve.config import env

    if given:
        return str(given)
    override = env.demo_model_path()
    if override:
        return override
    bundled = model_path()
    if bundled is None:
        raise InvalidRequest("a model path is required (the bundled demo model is not installed)", "model")
    return str(bundled)
