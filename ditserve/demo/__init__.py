"""The bundled demo model: a tiny FLUX-architecture model that draws one shape on a flat background.

It is what `ditserve generate` uses when no `--model-path` is given, so ditserve works with no download
and no network. It knows prompts of the form ``a {color} {shape} on the {position}, {background}
background`` at 64x64 and nothing else; `training/demo` in the repository trains it.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
EXAMPLE_PROMPT = "a red circle on the left, blue background"


def model_path() -> Path | None:
    """The bundled model's folder, or None when this installation lacks it."""
    return MODEL_DIR if (MODEL_DIR / "model_index.json").is_file() else None
