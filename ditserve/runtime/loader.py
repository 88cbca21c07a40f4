"""Resolve a model directory or Hugging Face id, read `model_index.json`, load its pipeline."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ditserve.api import InvalidRequest, ModelLimits, RequestDefaults
from ditserve.pipelines.base import Pipeline
from ditserve.pipelines.registry import pipeline_class

log = logging.getLogger(__name__)

# Optional, beside model_index.json: {"defaults": {"height": 64, "num_inference_steps": 20, ...}}.
# A model made for one resolution or step count says so here; requests still override it.
MODEL_DEFAULTS_FILE = "ditserve.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model directory, the pipeline class its `model_index.json` names, and the
    request defaults for it (the family's, with any the folder's `ditserve.json` sets) and limits
    (the family's, with what the folder's scheduler config implies)."""

    path: Path
    class_name: str
    pipeline_cls: type[Pipeline]
    defaults: RequestDefaults | None = None
    limits: ModelLimits | None = None

    def __post_init__(self):
        if self.defaults is None:
            object.__setattr__(self, "defaults", self.pipeline_cls.defaults)
        if self.limits is None:
            object.__setattr__(self, "limits", self.pipeline_cls.limits)


def resolve_model_path(model: str | Path) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, from the local cache first."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise InvalidRequest(f"model path {text} is not a directory", "model")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise InvalidRequest(f"model path {text} does not exist", "model")
    from huggingface_hub import snapshot_download

    try:  # the offline cache first, so a cached model never needs the network
        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss falls through to a download attempt
        pass
    try:
        return Path(snapshot_download(text))
    except Exception as exc:  # noqa: BLE001 - network, auth, not found: all the user's to fix
        raise InvalidRequest(
            f"model {text} is neither a local directory nor a reachable Hugging Face repo "
            f"({type(exc).__name__})", "model"
        ) from None


def inspect_model(model: str | Path) -> ModelSource:
    """Everything about a model that can be known without loading weights."""
    path = resolve_model_path(model)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise InvalidRequest(f"{path} has no model_index.json (not a diffusers model directory)", "model")
    try:
        index = json.loads(index_file.read_text())
        class_name = index["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{index_file} is malformed: {type(exc).__name__}: {exc}", "model") from None
    cls = pipeline_class(class_name)
    missing = [name for name in index if not name.startswith("_") and _needed(index[name])
               and not (path / name).is_dir()]
    if missing:
        raise InvalidRequest(f"{path} lacks component folders {missing}", "model")
    defaults, limits = cls.for_folder(path, cls.defaults, read_model_limits(path, cls.limits))
    return ModelSource(path, class_name, cls, read_model_defaults(path, defaults), limits)


def read_model_limits(path: Path, base: ModelLimits) -> ModelLimits:
    """`base`, checked against the folder's scheduler config, which is read strictly (a key that
    would change the math and that ditserve does not implement is refused here, before any weights
    load); raised to 2 steps when the schedule ends at a terminal sigma (`shift_terminal`): a
    1-step schedule is then 0/0 (in diffusers too), an image of NaNs."""
    from ditserve.sampling.scheduler_config import read_scheduler_config

    file = path / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise InvalidRequest(f"{path} has no scheduler/scheduler_config.json", "model")
    try:
        read_scheduler_config(file)
        terminal = json.loads(file.read_text()).get("shift_terminal")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:  # UnsupportedScheduler is a ValueError
        raise InvalidRequest(f"{file}: {exc}", "model") from None
    return replace(base, min_steps=max(base.min_steps, 2)) if terminal else base


def read_model_defaults(path: Path, base: RequestDefaults) -> RequestDefaults:
    """`base` with the values of `path/ditserve.json`'s "defaults" (if the file exists)."""
    file = path / MODEL_DEFAULTS_FILE
    if not file.is_file():
        return base
    try:
        given = json.loads(file.read_text()).get("defaults", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise InvalidRequest(f"{file} is malformed: {type(exc).__name__}: {exc}", "model") from None
    if not isinstance(given, dict):
        raise InvalidRequest(f"{file}: \"defaults\" must be an object", "model")
    types = {f.name: type(getattr(base, f.name)) for f in fields(RequestDefaults)}
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise InvalidRequest(f"{file}: unknown defaults {unknown} (known: {sorted(types)})", "model")
    for name, value in given.items():
        if types[name] is bool:
            if not isinstance(value, bool):
                raise InvalidRequest(f"{file}: default {name} must be true or false, got {value!r}", "model")
            continue
        integral = types[name] is int
        ok = isinstance(value, int) if integral else isinstance(value, (int, float)) and math.isfinite(value)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if integral else "a finite number"
            raise InvalidRequest(f"{file}: default {name} must be {kind}, got {value!r}", "model")
    log.debug("model defaults from %s: %s", file, given)
    return replace(base, **{k: types[k](v) for k, v in given.items()})


def _needed(entry) -> bool:
    # components listed as [null, null] are optional and absent (e.g. FLUX's image_encoder)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


def load_pipeline(source: ModelSource, device: torch.device, dtype: torch.dtype) -> Pipeline:
    start = time.perf_counter()
    try:
        pipe = source.pipeline_cls.load(source.path, device, dtype)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequest(f"cannot load model from {source.path}: {first_line}", "model") from None
    log.info("loaded %s from %s on %s (%s) in %.2f s", source.class_name, source.path, device,
             str(dtype).removeprefix("torch."), time.perf_counter() - start)
    return pipe
