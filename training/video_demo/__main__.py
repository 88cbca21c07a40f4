"""``python -m training.video_demo {train,export,evaluate}``: train the video demo model, ship it, measure it.

    python -m training.video_demo train --recipe gpu --device cuda --work-dir /tmp/vd --max-minutes 8
    python -m training.video_demo evaluate --model-path ditserve/demo/video_model --seeds 0 1

``train`` resumes from the checkpoints in ``--work-dir`` (run it again after an interruption);
``--stage vae`` then ``--stage dit`` split a run into two sittings (the checkpoints carried between);
``export`` writes the pipeline from whatever the checkpoints hold, e.g. mid-way through a run;
``sharpen`` fine-tunes an exported folder's VAE decoder in place (``sharpen.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from training import common_cli

from . import config

log = logging.getLogger("training.video_demo")

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "ditserve" / "demo" / "video_model"
EXPORT_MARGIN_S = 20


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.video_demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "export"):
        s = sub.add_parser(name)
        common_cli.add_run_args(s, sorted(config.RECIPES), "gpu", "checkpoints, tokenizer, encoded latents",
                                "clips encoded for the DiT (default: the recipe's)")
        s.add_argument("--vae-share", type=float, default=None,
                       help="the VAE's share of --max-minutes (default: the recipe's vae_share)")
        s.add_argument("--device", default="cpu")
        s.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
        s.add_argument("--vae-spatial", type=int, choices=sorted(config.VAE_CONFIGS), default=8,
                       help="the VAE's spatial compression (4: one level less, 16 x 16 latents a frame); "
                            "the same value for every sitting on a WORK_DIR")
        if name == "train":
            s.add_argument("--stage", choices=("all", "vae", "dit"), default="all",
                           help="vae: train the VAE only (all of --max-minutes), then stop; dit: take the VAE "
                                "from WORK_DIR's checkpoints as it is and train the DiT (all of --max-minutes)")
            s.add_argument("--dit-init", type=Path, default=None, metavar="FOLDER",
                           help="start the DiT and its text encoder from this exported pipeline folder (a "
                                "fine-tune: fresh optimiser, the recipe's warm-up and cosine) unless WORK_DIR "
                                "already has a DiT checkpoint")
            s.add_argument("--dit-lr", type=float, default=None, help="the DiT's peak learning rate "
                           "(default: the recipe's)")
        s.add_argument("--max-minutes", type=float, default=None,
                       help="stop (checkpointed, resumable) and export after about this long: the VAE gets at "
                            "most the recipe's vae_share of it")
    h = sub.add_parser("sharpen", help="fine-tune a pipeline folder's VAE decoder in place (encoder frozen)")
    h.add_argument("--model-path", type=Path, default=SHIPPED_MODEL)
    h.add_argument("--steps", type=int, default=2400)
    h.add_argument("--batch-size", type=int, default=4)
    h.add_argument("--lr", type=float, default=1e-4)
    h.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after about this long")
    h.add_argument("--check-clips", type=int, default=48,
                   help="held-out clips whose reconstructions are scored before, every 100 steps and after")
    h.add_argument("--widen", action="store_true", help="double the decoder's channels first (same pixels to start)")
    h.add_argument("--device", default="cpu")
    h.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("evaluate")
    common_cli.add_evaluate_args(e, SHIPPED_MODEL, "held-out combos to try (default: all 48)")
    e.add_argument("--guidance-scale", type=float, default=None, help="(default: the model's)")
    e.add_argument("--seen", action="store_true",
                   help="score training combos instead of the held-out ones (to choose settings on; --count of them, "
                        "default 48)")
    e.add_argument("--flow-shift", type=float, default=None, help="(default: the model's scheduler)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", type=Path, default=None, help="write the report (accuracies, wrong clips) here")
    e.add_argument("--grid", type=Path, default=None, help="save every 4th frame of each clip as one PNG here")
    e.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def _train(args: argparse.Namespace, export_only: bool) -> Path:
    from .dit import build_denoiser, train_dit
    from .export import export_pipeline
    from .scenes import split_combos
    from .vae import build_vae, encode_dataset, load_vae, train_vae

    r = config.recipe(args.recipe, args.vae_steps, args.dit_steps, args.dataset_size)
    r = dataclasses.replace(r, vae_spatial=args.vae_spatial)
    if getattr(args, "dit_lr", None) is not None:
        r = dataclasses.replace(r, dit=dataclasses.replace(r.dit, lr=args.dit_lr))
    device = torch.device(args.device)
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    train_combos, held_out = split_combos(r.seed, config.NUM_HELD_OUT)
    log.info("%d training combos, %d held out", len(train_combos), len(held_out))
    start = time.perf_counter()
    if export_only:
        vae, data, denoiser, dit_step = common_cli.load_for_export(
            work, r.seed, lambda seed: build_vae(seed, r.vae_spatial), build_denoiser)
        log.info("exporting the EMA weights of DiT step %d", dit_step)
    else:
        common_cli.use_tensor_cores(device)
        share = {"vae": 1.0, "dit": 0.0}.get(args.stage, args.vae_share or r.vae_share)
        vae_deadline, dit_deadline = common_cli.deadlines(args.max_minutes, share, EXPORT_MARGIN_S)
        if args.stage == "dit" and not (work / "vae.ckpt").is_file():
            raise SystemExit(f"--stage dit needs the VAE's checkpoints in {work} (from --stage vae)")
        if args.stage == "dit":
            vae, vae_steps = load_vae(work, r, device)
        else:
            vae, vae_steps = train_vae(work, r, train_combos, device, vae_deadline, args.vae_stop_after)
        if args.stage == "vae":
            from .scenes import sample_clips
            from .sharpen import reconstruction_shape_accuracy

            log.info("VAE trained (%d steps in all) in %.1f min; --stage dit goes on from here", vae_steps,
                     (time.perf_counter() - start) / 60)
            check = sample_clips(r.seed + 1, 48 if device.type == "cuda" else 4, held_out)  # as `sharpen` checks
            log.info("held-out clips through the VAE keep their shape in %.1f%% of frames (the ceiling on the "
                     "demo's shape accuracy)", 100 * reconstruction_shape_accuracy(vae, check))
            return work
        encode_deadline = None
        if args.max_minutes:
            encode_deadline = time.monotonic() + r.encode_share * 60 * args.max_minutes
        data = encode_dataset(work, r, vae, vae_steps, train_combos, device, encode_deadline)
        denoiser = train_dit(work, r, data, train_combos, device, dit_deadline, args.dit_stop_after,
                             init_from=args.dit_init)
        log.info("training done in %.1f min (this sitting)", (time.perf_counter() - start) / 60)
    return export_pipeline(args.out or work / "model", vae.eval(), data, denoiser.eval())


def _evaluate(args: argparse.Namespace) -> None:
    from ditserve import Generator

    from .evaluate import evaluate, held_out_combos, save_grid, seen_combos

    logging.getLogger("ditserve").setLevel(logging.WARNING)  # not a line per stage per clip
    gen = Generator.from_pretrained(args.model_path, device=args.device, dtype=torch.float32)
    request = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.guidance_scale),
                                 ("flow_shift", args.flow_shift)) if v is not None}
    start = time.perf_counter()
    combos = seen_combos(args.count or 48) if args.seen else held_out_combos(args.count)
    report = evaluate(gen, combos, tuple(args.seeds), **request)
    elapsed = time.perf_counter() - start
    print(report.summary())
    print(f"{elapsed / len(report.results):.3f} s per clip on {args.device}")
    for item in report.to_dict()["wrong"]:
        print(f"  {item}")
    if args.json:
        result = {"model": str(args.model_path), "seeds": args.seeds, "request": request, "device": args.device,
                  "s_per_clip": elapsed / len(report.results), **report.to_dict()}
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.grid:
        save_grid(report, args.grid)


def _sharpen(args: argparse.Namespace) -> None:
    from .sharpen import sharpen_decoder

    common_cli.use_tensor_cores(torch.device(args.device))
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else None
    result = sharpen_decoder(args.model_path, config.SEED, args.steps, args.batch_size, args.lr, deadline=deadline,
                             num_check=args.check_clips, widen=args.widen, device=torch.device(args.device))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.command == "sharpen":
        common_cli.run(args, lambda a, export_only: _sharpen(a), _evaluate)
    else:
        common_cli.run(args, _train, _evaluate)


if __name__ == "__main__":
    main()
