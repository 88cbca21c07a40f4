"""Model load time from local disk: a random FLUX.1-dev-shaped transformer folder in diffusers format
(real widths, `--double`/`--single` blocks; FLUX.1-dev has 19 and 38), sharded as diffusers shards it,
loaded by ditserve's loader (models/common/loading.py: parallel reads straight into the final tensors)
on `--device` in `--dtype`. Each load runs in a fresh process, so its peak RSS is the load's own: the
row says how many bytes beyond the model's it needed (`extra_rss_gib`; a second copy of the weights would
show as ≈ the model's size). The page cache is warm after the first load (`cold_s` is the first, when
the folder was just written it may be warm too; drop caches as root for a true cold read).

    python benchmarks/bench_load.py                                  # CPU, 2 + 4 blocks (≈ 2.5 GB bf16)
    python benchmarks/bench_load.py --device cuda --double 19 --single 38 --compare --out FILE  # FLUX.1-dev size

Row: model, gpu, device, dtype, file_dtype, weights_gib, shards, load_s (median of --reps), cold_s,
gib_per_s, extra_rss_gib, workers, commit; with `--compare`, safetensors_load_s (the previous reader:
safe_open tensor by tensor, then `.to(device, dtype)`) and diffusers_load_s (`from_pretrained(...).to(device)`)
with their extra RSS. On the CPU the previous reader returns tensors backed by the file's mapping, read
lazily at first use, so its load time there is not a read time; on a GPU every byte is copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_load")

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])
GIB = 2**30


def write_folder(folder: Path, double: int, single: int, file_dtype: str, shard_gb: float, seed: int = 0) -> int:
    """A diffusers FLUX transformer folder of random weights (config.json, sharded safetensors and
    index); returns the number of weights."""
    import torch
    from diffusers import FluxTransformer2DModel

    arch = dict(FLUX_DEV, num_layers=double, num_single_layers=single)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**arch)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **arch}))
    from safetensors.torch import save_file

    dtype = getattr(torch, file_dtype)
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            shards.append(dict(shard))
            shard, shard_bytes = {}, 0

    for name, p in ref.state_dict().items():
        t = (torch.rand(p.shape, generator=gen) * 0.02 - 0.01).to(dtype)
        if shard_bytes and shard_bytes + t.numel() * t.element_size() > shard_gb * 1e9:
            flush()
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        total += t.numel()
    flush()
    for k, tensors in enumerate(shards):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in tensors}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * torch.finfo(dtype).bits // 8}, "weight_map": weight_map}))
    return total


CHILD = r"""
import contextlib, json, sys, time
import torch
from ditserve.models.common.loading import sharded_loading
from ditserve.models.flux.weights import load_flux_dit
folder, device, dtype, reader = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4]
def rss():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("VmRSS", "VmHWM"))}
try:  # reset the high-water mark so that it is the load's own
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
before = rss()["VmRSS"]
if device.startswith("cuda"):
    torch.cuda.init()
start = time.perf_counter()
if reader == "diffusers":  # diffusers' own loader, as its pipelines load
    from diffusers import FluxTransformer2DModel
    dit = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(device)
else:  # "ours", or "safetensors": the previous path (safe_open, tensor by tensor, .to(device, dtype))
    with sharded_loading(lambda model: None) if reader == "safetensors" else contextlib.nullcontext():
        dit = load_flux_dit(folder, device, dtype)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in dit.parameters())
on_host = weights if device == "cpu" else 0
print(json.dumps({"load_s": seconds, "weights": weights, "extra_rss": rss()["VmHWM"] - before - on_host}))
"""


def load_once(folder: Path, device: str, dtype: str, env: dict, reader: str = "ours") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), device, dtype, reader], capture_output=True,
                         text=True, env=env, cwd=str(ROOT), check=False)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "load failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--file-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dtype", default=None, help="load dtype (default: the file's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size as diffusers writes them (default 5 GB)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="DITSERVE_LOAD_WORKERS for the loads (default: the loader's)")
    p.add_argument("--folder", type=Path, default=None, help="reuse or keep the folder here (default: a temporary one)")
    p.add_argument("--compare", action="store_true",
                   help="also time the previous reader (safetensors, tensor by tensor) and diffusers' from_pretrained")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ditserve.bench.common import base_row

    dtype = args.dtype or args.file_dtype
    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_load_")
        folder = Path(tmp.name) / "transformer"
    if not (folder / "config.json").is_file():
        start = time.perf_counter()
        n = write_folder(folder, args.double, args.single, args.file_dtype, args.shard_gb)
        log.info("wrote %.2fB random weights to %s in %.1f s", n / 1e9, folder, time.perf_counter() - start)
    # the checkout first, then whatever path the caller set (the GPU machine carries diffusers on PYTHONPATH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.workers is not None:
        env["DITSERVE_LOAD_WORKERS"] = str(args.workers)
    runs = [load_once(folder, args.device, dtype, env) for _ in range(args.reps + 1)]
    times = [r["load_s"] for r in runs[1:]]
    weights = runs[0]["weights"]
    row = {**base_row("flux-shaped", dtype, f"{args.double}+{args.single} blocks"), "device": args.device,
           "file_dtype": args.file_dtype, "weights_gib": weights / GIB,
           "shards": len(list(folder.glob("*.safetensors"))), "load_s": statistics.median(times),
           "cold_s": runs[0]["load_s"], "gib_per_s": weights / GIB / statistics.median(times),
           "extra_rss_gib": max(r["extra_rss"] for r in runs) / GIB, "workers": args.workers}
    sys.stdout.write(f"load {row['weights_gib']:.2f} GiB ({row['shards']} shards) on {args.device} in {dtype}: "
                     f"{row['load_s']:.2f} s median ({row['gib_per_s']:.2f} GiB/s), first {row['cold_s']:.2f} s, "
                     f"{row['extra_rss_gib']:.2f} GiB beyond the weights' own\n")
    if args.compare:
        for reader in ("safetensors", "diffusers"):
            got = [load_once(folder, args.device, dtype, env, reader) for _ in range(args.reps)]
            row[f"{reader}_load_s"] = statistics.median(r["load_s"] for r in got)
            row[f"{reader}_extra_rss_gib"] = max(r["extra_rss"] for r in got) / GIB
            sys.stdout.write(f"  {reader}: {row[f'{reader}_load_s']:.2f} s median (ours in "
                             f"{row['load_s'] / row[f'{reader}_load_s']:.2f}x its time), "
                             f"{row[f'{reader}_extra_rss_gib']:.2f} GiB beyond the weights' own\n")
    if args.out:
        args.out.write_text(json.dumps(row, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
