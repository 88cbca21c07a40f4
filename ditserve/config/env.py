"""The only reader of os.environ in ditserve."""

from __future__ import annotations

import os


def log_level() -> str:
    return os.environ.get("DITSERVE_LOG_LEVEL", "INFO").upper()


def demo_model_path() -> str | None:
    """An override for the default model when `--model-path` is not given."""
    return os.environ.get("DITSERVE_DEFAULT_MODEL")


def commit_override() -> str | None:
    """The commit a benchmark reports when it runs from a copy without git metadata."""
    return os.environ.get("DITSERVE_COMMIT")


def cache_dir():
    """ditserve's per-user cache folder: $XDG_CACHE_HOME/ditserve, else ~/.cache/ditserve."""
    from pathlib import Path

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ditserve"


def load_workers() -> int | None:
    """$DITSERVE_LOAD_WORKERS: threads reading checkpoint files (None: the loader's default)."""
    value = os.environ.get("DITSERVE_LOAD_WORKERS")
    return int(value) if value and value.isdigit() and int(value) > 0 else None
