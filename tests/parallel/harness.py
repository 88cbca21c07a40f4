"""Run cases on a real gloo group of CPU processes: every rank builds the engine of a case with its
parallel transforms, generates, and rank 0 saves the pixels for the test to compare."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import traceback
from pathlib import Path

import numpy as np


def rank_main(rank: int, world: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    from ditserve.api import GenerationRequest
    from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
    from ditserve.parallel.groups import init_groups
    from ditserve.runtime.engine import Engine

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(workdir)
    cases = pickle.loads((work / "cases.pkl").read_bytes())
    dist.init_process_group("gloo", init_method=f"file://{work / 'store'}", rank=rank, world_size=world)
    try:
        for name, folder, parallel, request in cases:
            try:
                pcfg = ParallelConfig(num_gpus=world, **parallel)
                groups = init_groups(pcfg, torch.device("cpu"))
                cfg = EngineConfig(ModelConfig(str(folder), "cpu", "float32"), parallel=pcfg)
                engine = Engine.from_config(cfg, groups=groups)
                out = engine.generate(GenerationRequest(**request))
                pixels = out.videos[0] if out.videos else np.asarray(out.images[0])
                if rank == 0:
                    np.save(work / f"{name}.npy", pixels)
            except Exception:  # noqa: BLE001 - the test reads the failure and reports it
                (work / f"{name}.rank{rank}.err").write_text(traceback.format_exc())
                raise
    finally:
        dist.destroy_process_group()


def run_cases(cases: list, world: int, workdir: Path, timeout: float = 600) -> dict[str, np.ndarray]:
    """Run `cases` [(name, folder, ParallelConfig kwargs minus num_gpus, request kwargs)] on `world`
    CPU ranks; returns rank 0's pixels per case name. Raises with the ranks' tracebacks on failure."""
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
