"""Model load time from local disk: a random transformer folder in diffusers format at a real model's
shape, sharded as diffusers shards it, loaded by ditserve's loader (models/common/loading.py: parallel
reads straight into the final tensors) on `--device` in `--dtype`.

`--model flux` (the default): FLUX.1-dev widths with `--double`/`--single` blocks (FLUX.1-dev has 19
and 38), loaded by `load_flux_dit`. `--model wan2.1-t2v-14b`: the Wan2.1-T2V-14B config of
ditserve/bench/architectures.json with `--layers` blocks (default its 40) and, for smoke runs,
`--dim` for a narrower model (a multiple of the head dim, 128; the feed-forward width scales with it),
loaded by `load_wan_dit` (the tensors diffusers keeps in float32 are read into float32).

Each load runs in a fresh process, so its peak RSS is the load's own: the row says how many bytes beyond
the model's it needed (`extra_rss_gib`; a second copy of the weights would show as ≈ the model's size).
The page cache is warm after the first load (`cold_s` is the first, when the folder was just written it
may be warm too; drop caches as root for a true cold read). The folder is written one shard at a time:
at most one shard of random weights is in memory.

    python benchmarks/bench_load.py                                  # CPU, 2 + 4 blocks (≈ 2.5 GB bf16)
    python benchmarks/bench_load.py --device cuda --double 19 --single 38 --compare --out FILE  # FLUX.1-dev size
    python benchmarks/bench_load.py --model wan2.1-t2v-14b --layers 2 --dim 256 --reps 1 --compare  # CPU smoke
    python benchmarks/bench_load.py --model wan2.1-t2v-14b --device cuda --compare --out FILE  # Wan-14B (≈ 26.6 GiB)

Row: model (flux or wan2.1-t2v-14b), gpu, device, dtype, file_dtype, shape, params (elements loaded),
weights_gib, shards, load_s (median of --reps), cold_s, gib_per_s, extra_rss_gib, workers, commit; with
`--compare`, safetensors_load_s (the previous reader: safe_open tensor by tensor, then `.to(device, dtype)`)
and diffusers_load_s (`from_pretrained(...).to(device)`; diffusers and the class are imported before
the clock starts, as ditserve's loader is) with their extra RSS. On the CPU the previous
reader returns tensors backed by the file's mapping, read lazily at first use, so its load time there is
not a read time; on a GPU every byte is copied.
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
WAN_14B = "wan2.1-t2v-14b"
MODELS = ("flux", WAN_14B)
GIB = 2**30


def wan_arch(layers: int, dim: int | None = None) -> dict:
    """Wan2.1-T2V-14B's diffusers config (ditserve/bench/architectures.json) with `layers` blocks and, if
    given, width `dim`: heads of the real head dim, the feed-forward width scaled by the same factor."""
    from ditserve.bench.common import arch_kwargs, architectures

    arch = dict(arch_kwargs(architectures()[WAN_14B]["transformer"]), num_layers=layers)
    if dim is not None:
        head_dim, width = arch["attention_head_dim"], arch["num_attention_heads"] * arch["attention_head_dim"]
        if dim <= 0 or dim % head_dim:
            raise ValueError(f"--dim {dim} is not a positive multiple of the head dim {head_dim}")
        arch |= {"num_attention_heads": dim // head_dim, "ffn_dim": round(arch["ffn_dim"] * dim / width)}
    return arch


def model_config(args: argparse.Namespace) -> tuple[dict, str]:
    """The chosen model's diffusers `config.json` and the row's shape."""
    if args.model == "flux":
        arch = dict(FLUX_DEV, num_layers=args.double, num_single_layers=args.single)
        return {"_class_name": "FluxTransformer2DModel", **arch}, f"{args.double}+{args.single} blocks"
    arch = wan_arch(args.layers, args.dim)
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    return {"_class_name": "WanTransformer3DModel", **arch}, f"{args.layers} layers, width {width}"


def write_folder(folder: Path, config: dict, file_dtype: str, shard_gb: float, seed: int = 0) -> int:
    """A diffusers transformer folder of random weights for `config` (its `_class_name` names the
    diffusers class): config.json, sharded safetensors and index; returns the number of weights. Each
    shard is saved as soon as it is full, so at most one shard of weights is in memory; config.json is
    written last (a folder with one is complete and is reused)."""
    import diffusers
    import torch
    from safetensors.torch import save_file

    arch = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = getattr(diffusers, config["_class_name"])(**arch)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("diffusion_pytorch_model*"):  # an interrupted write's
        stale.unlink()
    dtype = getattr(torch, file_dtype)
    gen = torch.Generator().manual_seed(seed)
    shard, shard_bytes, parts, weight_map, total = {}, 0, [], {}, 0

    def flush():  # saved under a temporary name: the final one needs the number of shards
        nonlocal shard, shard_bytes
        if shard:
            part = folder / f"diffusion_pytorch_model.part{len(parts)}"
            save_file(shard, str(part), metadata={"format": "pt"})
            parts.append((part, list(shard)))
            shard, shard_bytes = {}, 0

    for name, p in ref.state_dict().items():
        nbytes = p.numel() * dtype.itemsize
        if shard_bytes and shard_bytes + nbytes > shard_gb * 1e9:
            flush()
        shard[name] = (torch.rand(p.shape, generator=gen) * 0.02 - 0.01).to(dtype)
        shard_bytes += nbytes
        total += p.numel()
    flush()
    for k, (part, names) in enumerate(parts):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(folder / file)
        weight_map |= dict.fromkeys(names, file)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    return total


CHILD = r"""
import contextlib, importlib, json, sys, time
import torch
from ditserve.models.common.loading import sharded_loading
# the diffusers class (config.json's _class_name) -> ditserve's loader for its folder
LOADERS = {"FluxTransformer2DModel": ("ditserve.models.flux.weights", "load_flux_dit"),
           "WanTransformer3DModel": ("ditserve.models.wan.weights", "load_wan_dit")}
folder, device, dtype, reader, cls = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4], sys.argv[5]
if reader == "diffusers":  # diffusers' own loader, as its pipelines load (its class imported before the clock)
    import diffusers
    ref_cls = getattr(diffusers, cls)
    def load():
        return ref_cls.from_pretrained(folder, torch_dtype=dtype).to(device)
else:  # "ours", or "safetensors": the previous path (safe_open, tensor by tensor, .to(device, dtype))
    module, name = LOADERS[cls]
    ours = getattr(importlib.import_module(module), name)
    def load():
        with sharded_loading(lambda model: None) if reader == "safetensors" else contextlib.nullcontext():
            return ours(folder, device, dtype)
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
dit = load()
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in dit.parameters())
on_host = weights if device == "cpu" else 0
print(json.dumps({"load_s": seconds, "weights": weights, "params": sum(p.numel() for p in dit.parameters()),
                  "extra_rss": rss()["VmHWM"] - before - on_host}))
"""


def load_once(folder: Path, device: str, dtype: str, env: dict, reader: str = "ours") -> dict:
    cls = json.loads((folder / "config.json").read_text())["_class_name"]
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), device, dtype, reader, cls], capture_output=True,
                         text=True, env=env, cwd=str(ROOT), check=False)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "load failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux", choices=MODELS, help="flux (FLUX.1-dev widths) or wan2.1-t2v-14b")
    p.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--layers", type=int, default=40, help="Wan blocks (Wan2.1-T2V-14B: 40)")
    p.add_argument("--dim", type=int, default=None,
                   help="Wan model width for smoke runs, a multiple of 128 (default: Wan2.1-T2V-14B's 5120)")
    p.add_argument("--file-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dtype", default=None, help="load dtype (default: the file's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size as diffusers writes them (default 5 GB)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=None,
                   help="DITSERVE_LOAD_WORKERS for the loads (default: the loader's)")
    p.add_argument("--folder", type=Path, default=None, help="reuse or keep the folder here (default: a temporary one)")
    p.add_argument("--compare", action="store_true",
                   help="also time the previous reader (safetensors, tensor by tensor) and diffusers' from_pretrained")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from ditserve.bench.common import base_row

    try:
        config, shape = model_config(args)
    except ValueError as exc:
        p.error(str(exc))
    dtype = args.dtype or args.file_dtype
    tmp = None
    folder = args.folder
    if folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_load_")
        folder = Path(tmp.name) / "transformer"
    if (folder / "config.json").is_file():  # reused: it must be the model asked for
        found = json.loads((folder / "config.json").read_text())
        if found != json.loads(json.dumps(config)):
            p.error(f"{folder} holds another config than --model {args.model} {shape} asks for; pass another --folder")
    else:
        start = time.perf_counter()
        n = write_folder(folder, config, args.file_dtype, args.shard_gb)
        log.info("wrote %d random weights (%.2fB) to %s in %.1f s", n, n / 1e9, folder, time.perf_counter() - start)
    # the checkout first, then whatever path the caller set (the GPU machine carries diffusers on PYTHONPATH)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.workers is not None:
        env["DITSERVE_LOAD_WORKERS"] = str(args.workers)
    runs = [load_once(folder, args.device, dtype, env) for _ in range(args.reps + 1)]
    times = [r["load_s"] for r in runs[1:]]
    weights = runs[0]["weights"]
    row = {**base_row(args.model, dtype, shape), "device": args.device, "file_dtype": args.file_dtype,
           "params": runs[0]["params"], "weights_gib": weights / GIB,
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
