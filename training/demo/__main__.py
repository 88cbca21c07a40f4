"""``python -m training.demo {train,export,evaluate}``: train the demo model, ship it, measure it.

    python -m training.demo train --work-dir /tmp/demo --out ditserve/demo/model   # ~2 h on 2 CPU cores
    python -m training.demo evaluate                                              # held-out accuracy

``train`` resumes from the checkpoints in ``--work-dir`` (run it again after an interruption);
``export`` writes the pipeline from whatever the checkpoints hold, e.g. mid-way through a run.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from training import common_cli

from . import config

log = logging.getLogger("training.demo")

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "ditserve" / "demo" / "model"
EXPORT_MARGIN_S = 30
VAE_SHARE = 0.35  # of --max-minutes, at most


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "export"):
        s = sub.add_parser(name)
        common_cli.add_run_args(s, sorted(config.RECIPES), "full", "checkpoints, tokenizers, encoded latents",
                                "training scenes (default: the recipe's)")
        s.add_argument("--device", default="cpu")
        s.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
        s.add_argument("--max-minutes", type=float, default=None,
                       help="stop (checkpointed, resumable) and export after about this long: "
                            "the VAE gets at most 35%% of it")
    e = sub.add_parser("evaluate")
    common_cli.add_evaluate_args(e, SHIPPED_MODEL, "held-out combos to try (default: all)")
    e.add_argument("--grid", type=Path, default=None, help="save all images as one PNG here")
    e.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def _train(args: argparse.Namespace, export_only: bool) -> Path:
    from .dit import build_denoiser, train_dit
    from .export import export_pipeline
    from .scenes import split_combos
    from .vae import build_vae, encode_dataset, scene_set, train_vae

    r = config.recipe(args.recipe, args.vae_steps, args.dit_steps, args.dataset_size)
    device = torch.device(args.device)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    train_combos, held_out = split_combos(r.seed, config.NUM_HELD_OUT)
    log.info("%d training combos, %d held out", len(train_combos), len(held_out))
    start = time.perf_counter()
    if export_only:
        vae, data, denoiser, dit_step = common_cli.load_for_export(work, r.seed, build_vae, build_denoiser)
        log.info("exporting the EMA weights of DiT step %d", dit_step)
    else:
        common_cli.use_tensor_cores(device)
        vae_deadline, dit_deadline = common_cli.deadlines(args.max_minutes, VAE_SHARE, EXPORT_MARGIN_S)
        drawn: list = []

        def scenes():  # drawn once, and only if the VAE or the latents still need them
            if not drawn:
                drawn.append(scene_set(r, train_combos))
                log.info("drew %d training scenes", len(drawn[0][0]))
            return drawn[0]

        vae, vae_steps = train_vae(work, r, scenes, device, vae_deadline, args.vae_stop_after)
        data = encode_dataset(work, r, vae, vae_steps, scenes, device)
        drawn.clear()
        denoiser = train_dit(work, r, data, train_combos, device, dit_deadline, args.dit_stop_after)
        log.info("training done in %.1f min (this sitting)", (time.perf_counter() - start) / 60)
    return export_pipeline(args.out or work / "model", vae.eval(), data, denoiser.eval())


def _evaluate(args: argparse.Namespace) -> None:
    from ditserve import Generator

    from .evaluate import evaluate, held_out_combos, save_grid

    logging.getLogger("ditserve").setLevel(logging.WARNING)  # not a line per stage per image
    gen = Generator.from_pretrained(args.model_path, device="cpu", dtype=torch.float32)
    request = {} if args.steps is None else {"num_inference_steps": args.steps}
    start = time.perf_counter()
    report = evaluate(gen, held_out_combos(args.count), tuple(args.seeds), **request)
    elapsed = time.perf_counter() - start
    print(report.summary())  # noqa: T201 - this is the command's output
    print(f"{elapsed / len(report.results):.3f} s per image on the CPU ({torch.get_num_threads()} threads)")  # noqa: T201
    for combo, seed, result in zip(report.combos, report.seeds, report.results):
        if not all(result.values()):
            wrong = [f for f, ok in result.items() if not ok]
            print(f"  seed {seed}: {combo.caption!r}: wrong {wrong}")  # noqa: T201
    if args.grid:
        save_grid(report, args.grid)


def main(argv: list[str] | None = None) -> None:
    common_cli.run(_parse(argv), _train, _evaluate)


if __name__ == "__main__":
    main()
