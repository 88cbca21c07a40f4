"""Kernel-level profile of ditserve's FLUX step on the GPU, per compile mode (device-time notes)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ditserve.accel.compile import apply_compile
from ditserve.accel.cudagraph import CudaGraphDiT
from ditserve.bench.common import median_time
from ditserve.bench.flux import build, inputs


def kernel_table(fn, out_path: str, rows: int = 40) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)
    with open(out_path, "w") as f:
        f.write(table)
    logging.info("\n%s", "\n".join(table.splitlines()[: rows // 2 + 4]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--modes", default="default,max-autotune-no-cudagraphs")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    ref, ours = build("flux.1-dev", "cuda", torch.bfloat16)
    del ref
    inp = inputs(ours.cfg, 1024, 1024, 512, "cuda", torch.bfloat16)
    pe = ours.positional_tables(inp.img_ids, inp.txt_ids)
    results = {}
    with torch.no_grad():
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            compiled = apply_compile(ours, None if mode == "default" else mode)
            kernel_table(lambda: compiled(inp, pe), f"{args.out}/kernels_{mode}.txt")
            graphed = CudaGraphDiT(compiled)
            results[mode] = median_time(lambda: graphed(inp, pe), warmup=3, reps=20)
            logging.info("%s: %.4f s/step", mode, results[mode])
            del graphed
    with open(f"{args.out}/profile_summary.json", "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
