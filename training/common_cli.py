"""What the image and video demos' commands (``python -m training.demo`` / ``training.video_demo``)
share: their common flags, the recipe overrides those flags make, the checkpoints ``export`` ships,
and the dispatch of a parsed command line."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import torch

R = TypeVar("R")  # a demo's config.Recipe: a frozen dataclass with .vae, .dit and .dataset_size


def add_run_args(s: argparse.ArgumentParser, recipes: list[str], default: str, work_help: str,
                 dataset_help: str) -> None:
    """The flags ``train`` and ``export`` share: where, which recipe, and the overrides of its schedule."""
    s.add_argument("--work-dir", type=Path, required=True, help=work_help)
    s.add_argument("--out", type=Path, default=None, help="pipeline folder to write (default: WORK_DIR/model)")
    s.add_argument("--recipe", default=default, choices=recipes)
    s.add_argument("--vae-steps", type=int, default=None)
    s.add_argument("--dit-steps", type=int, default=None)
    s.add_argument("--dataset-size", type=int, default=None, help=dataset_help)
    s.add_argument("--vae-stop-after", type=int, default=None, metavar="STEP",
                   help="stop the VAE after this step of its schedule (checkpointed, resumable)")
    s.add_argument("--dit-stop-after", type=int, default=None, metavar="STEP",
                   help="stop the DiT after this step of its schedule (checkpointed, resumable)")


def add_evaluate_args(e: argparse.ArgumentParser, model_path: Path, count_help: str) -> None:
    """The flags ``evaluate`` starts with: which model, how many held-out prompts, which seeds and steps."""
    e.add_argument("--model-path", type=Path, default=model_path)
    e.add_argument("--count", type=int, default=None, help=count_help)
    e.add_argument("--seeds", type=int, nargs="+", default=[0])
    e.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")


def overridden(r: R, vae_steps: int | None = None, dit_steps: int | None = None,
               dataset_size: int | None = None) -> R:
    """Recipe ``r`` with its stages' step counts or its dataset size replaced where given."""
    if vae_steps is not None:
        r = replace(r, vae=replace(r.vae, steps=vae_steps))
    if dit_steps is not None:
        r = replace(r, dit=replace(r.dit, steps=dit_steps))
    if dataset_size is not None:
        r = replace(r, dataset_size=dataset_size)
    return r


def use_tensor_cores(device: torch.device) -> None:
    """On CUDA: TF32 matmuls and convolutions, and cuDNN's autotuner (fixed shapes every step)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def deadlines(max_minutes: float | None, vae_share: float, margin_s: float) -> tuple[float | None, float | None]:
    """The VAE's and the DiT's deadlines (``time.monotonic()`` values) for a run of ``max_minutes``
    from now: the VAE gets at most ``vae_share`` of it, the DiT the rest less ``margin_s`` for the
    export. None, None without a limit."""
    if not max_minutes:
        return None, None
    now = time.monotonic()
    return now + vae_share * 60 * max_minutes, now + 60 * max_minutes - margin_s


def load_for_export(work: Path, seed: int, build_vae: Callable[[int], torch.nn.Module],
                    build_denoiser: Callable[[int, Path], torch.nn.Module]) -> tuple:
    """What ``export`` ships from ``work``'s checkpoints as they are: (VAE, encoded latents, the DiT's
    EMA, the DiT's step)."""
    vae = build_vae(seed)
    vae.load_state_dict(torch.load(work / "vae.ckpt", map_location="cpu")["model"])
    data = torch.load(work / "latents.pt", map_location="cpu")
    denoiser = build_denoiser(seed, work)
    state = torch.load(work / "dit.ckpt", map_location="cpu")
    denoiser.load_state_dict(state["ema"])
    return vae, data, denoiser, state["step"]


def run(args: argparse.Namespace, train: Callable[[argparse.Namespace, bool], object],
        evaluate: Callable[[argparse.Namespace], None]) -> None:
    """Set up logging and torch's threads, then run the parsed command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.command == "evaluate":
        evaluate(args)
    else:
        train(args, export_only=args.command == "export")
