"""Run cases on a real gloo group of CPU processes: every rank builds the engine of a case with its
parallel transforms (the code path the executor's ranks take), generates, and rank 0 saves the
pixels for the test to compare with the single-process engine. One group serves many cases, so the
processes start once per world size.

A case is (name, folder, ParallelConfig kwargs without num_gpus, request kwargs, options); options:
- "break": "pad_mask" runs with padded keys left unmasked (a fixture must be able to fail);
- every rank records how many DiT parameters it holds ({name}.rank{r}.json).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pickle
import traceback
from pathlib import Path

import numpy as np


def _broken(option: str | None):
    """A context that breaks one part of sequence parallelism for the case (or nothing)."""
    import contextlib

    from ditserve.parallel.attention import SeqState

    @contextlib.contextmanager
    def unmasked_padding():
        plain = SeqState.key_mask
        SeqState.key_mask = lambda self, mask, batch: None if mask is None else mask.bool()
        try:
            yield
        finally:
            SeqState.key_mask = plain

    return unmasked_padding() if option == "pad_mask" else contextlib.nullcontext()


def _run_case(rank: int, world: int, work: Path, case) -> None:
    import torch

    from ditserve.api import GenerationRequest
    from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
    from ditserve.parallel.groups import init_groups
    from ditserve.runtime.engine import Engine

    name, folder, parallel, request, options = case
    pcfg = ParallelConfig(num_gpus=world, **parallel)
    groups = init_groups(pcfg, torch.device("cpu"))
    cfg = EngineConfig(ModelConfig(str(folder), "cpu", "float32"), parallel=pcfg)
    with _broken(options.get("break")):
        engine = Engine.from_config(cfg, groups=groups)
        out = engine.generate(GenerationRequest(**request))
    dit = engine.pipeline.dit
    held = sum(p.numel() for p in dit.parameters())
    (work / f"{name}.rank{rank}.json").write_text(json.dumps({"dit_numel": held}))
    if rank == 0:
        np.save(work / f"{name}.npy", out.videos[0] if out.videos else np.asarray(out.images[0]))


def rank_main(rank: int, world: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(workdir)
    cases = pickle.loads((work / "cases.pkl").read_bytes())
    dist.init_process_group("gloo", init_method=f"file://{work / 'store'}", rank=rank, world_size=world)
    try:
        for case in cases:
            try:
                _run_case(rank, world, work, case)
            except Exception:  # noqa: BLE001 - the test reads the failure and reports it
                (work / f"{case[0]}.rank{rank}.err").write_text(traceback.format_exc())
                raise
    finally:
        dist.destroy_process_group()


def run_cases(cases: list, world: int, workdir: Path, timeout: float = 900) -> dict[str, np.ndarray]:
    """Run `cases` on `world` CPU ranks; rank 0's pixels per case name. Raises with the ranks'
    tracebacks when any rank fails."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "cases.pkl").write_bytes(pickle.dumps(cases))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, str(workdir))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = sorted(workdir.glob("*.err"))
    if errors or any(p.exitcode for p in procs):
        raise RuntimeError("ranks failed:\n" + "\n".join(e.read_text() for e in errors)
                           + f"\nexit codes {[p.exitcode for p in procs]}")
    return {name: np.load(workdir / f"{name}.npy") for name, *_ in cases}


def held_parameters(workdir: Path, name: str, world: int) -> list[int]:
    """DiT parameters each rank held in case `name`."""
    return [json.loads((workdir / f"{name}.rank{r}.json").read_text())["dit_numel"] for r in range(world)]
