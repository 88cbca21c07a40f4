"""Scaling of one denoising step over 1, 2, 4 and 8 GPUs (GPU; real sizes, random weights).

For each model and GPU count, every parallel mode that fits: the step is the guidance prediction of
one step (cond and uncond, as the pipelines run them: one batch of two on a single GPU, one branch
per half with CFG parallelism), timed on rank 0 between barriers. `speedup` is against the 1-GPU
step of the same run. `rel_l2` is the model's prediction's distance from the 1-GPU one for the
branches rank 0 ran, `rel_l2_guided` the guided one's (the guidance scale 4 magnifies the difference
of two predictions about 5x); same weights and inputs (TP draws its weights per shard, so it has
neither). The 1-GPU row's `rel_l2_batch_floor` is the distance that only running the cond branch alone
(batch 1 instead of 2) makes: the bf16 noise a mode's `rel_l2` is to be read against. On several
GPUs, `comm_s` is the NCCL kernels' time in one more, profiled step on rank 0
(waits for the other ranks included) against `kernel_s`, all kernels, and `comm_alone_s` the same
step's `collectives` (recorded: which, sizes, groups) replayed alone, back to back: the transfer time a
step cannot go below without overlapping it with compute.

    python benchmarks/bench_parallel.py [--models wan2.1-t2v-14b,flux.1-dev,qwen-image] [--max-gpus 8] \
        [--counts 1,2,4,8] [--reps 5] [--out benchmarks/results/parallel_h200.json]   # rows written as they come
    python benchmarks/bench_parallel.py --tiny [--models tiny-flux]   # CPU smoke run: gloo, 1 and 2 ranks

Scenarios: Wan2.1-14B at 1280x720x81 (75,600 tokens) with CFG-parallel, Ulysses, Ring and USP (and
CFG x Ulysses); FLUX.1-dev at 1024x1024 with true CFG: CFG-parallel, Ulysses, CFG x Ulysses; Qwen-Image at
1328x1328: CFG-parallel, Ulysses, CFG x Ulysses, USP; TP where asked (`--modes`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_parallel")


@dataclass(frozen=True)
class Scenario:
    family: str  # flux | qwen | wan
    height: int
    width: int
    frames: int = 0
    txt: int = 512
    modes: tuple[str, ...] = ("ulysses",)
    arch: dict | None = field(default=None, hash=False)  # None: architectures.json's entry


SCENARIOS = {
    "wan2.1-t2v-14b": Scenario("wan", 720, 1280, frames=81, modes=("cfg", "ulysses", "ring", "usp",
                                                                             "cfg-ulysses")),
    "flux.1-dev": Scenario("flux", 1024, 1024, txt=512, modes=("cfg", "ulysses", "cfg-ulysses")),
    "qwen-image": Scenario("qwen", 1328, 1328, txt=128, modes=("cfg", "ulysses", "cfg-ulysses", "usp")),
}
TINY = {
    "tiny-flux": Scenario("flux", 64, 80, txt=31, modes=("cfg", "ulysses", "ring", "tp"), arch=dict(
        attention_head_dim=16, guidance_embeds=True, in_channels=16, joint_attention_dim=32, num_attention_heads=2,
        num_layers=1, num_single_layers=1, patch_size=1, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])),
    "tiny-wan": Scenario("wan", 48, 80, frames=9, txt=512, modes=("ulysses", "ring"), arch=dict(
        attention_head_dim=16, cross_attn_norm=True, eps=1e-6, ffn_dim=48, freq_dim=32, in_channels=16,
        num_attention_heads=2, num_layers=1, out_channels=16, patch_size=[1, 2, 2],
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64, text_dim=24)),
}


def degrees(mode: str, n: int) -> dict | None:
    """ParallelConfig degrees of `mode` on `n` GPUs; None where the mode does not fit."""
    if mode == "single":
        return {} if n == 1 else None
    if n == 1:
        return None
    half = n // 2
    return {"cfg": dict(cfg_parallel=True) if n == 2 else None, "ulysses": dict(ulysses_degree=n),
            "ring": dict(ring_degree=n), "tp": dict(tp_size=n),
            "usp": dict(ulysses_degree=half, ring_degree=2) if n >= 4 else None,
            "cfg-ulysses": dict(cfg_parallel=True, ulysses_degree=half) if n >= 4 else None}[mode]


def _family(name: str):
    if name == "flux":
        from ditserve.bench import flux as bench
        from ditserve.models.flux import FluxConfig, FluxDiT
        return FluxConfig, FluxDiT, bench
    if name == "qwen":
        from ditserve.bench import qwen_image as bench
        from ditserve.models.qwen_image.config import QwenImageConfig
        from ditserve.models.qwen_image.model import QwenImageDiT
        return QwenImageConfig, QwenImageDiT, bench
    from ditserve.bench import wan as bench
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT
    return WanConfig, WanDiT, bench


def build(model: str, sc: Scenario, groups, device, dtype):
    """This rank's DiT (TP shard if asked, random weights, sequence-parallel wrapper) and a function
    batch -> its inputs at the scenario's shape."""
    from ditserve.bench.common import arch_kwargs, architectures
    from ditserve.parallel.sequence import apply_sequence_parallel
    from ditserve.parallel.tensor import shard_model

    cfg_cls, dit_cls, bench = _family(sc.family)
    cfg = cfg_cls.from_dict(sc.arch if sc.arch is not None else arch_kwargs(architectures()[model]["transformer"]))
    with torch.device("meta"):
        dit = dit_cls(cfg)
    if groups.tp.size > 1:
        shard_model(dit, groups.tp)
    dit = dit.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 if p.ndim > 1 else 0.1, generator=gen)
    dit = apply_sequence_parallel(dit.to(dtype).eval(), groups)
    if sc.family == "wan":
        one = bench.inputs(cfg, sc.height, sc.width, sc.frames, device, dtype)
        other = torch.randn(one.context.shape, generator=gen.manual_seed(2), device=device, dtype=dtype)
        pair = type(one)(one.latents.repeat(2, 1, 1, 1, 1), one.timesteps.repeat(2), torch.cat([one.context, other]))
    else:
        pair = bench.inputs(cfg, sc.height, sc.width, sc.txt, device, dtype, batch=2)
    return dit, {BOTH: pair, BOTH[:1]: half(pair, 0), BOTH[1:]: half(pair, 1)}


BOTH = ("cond", "uncond")


def half(pair, i: int):
    """Branch `i` of a batch-of-two inputs dataclass: every tensor field with a batch dimension sliced
    (position ids and other per-token tables have none)."""
    fields = {f.name: getattr(pair, f.name) for f in dataclasses.fields(pair)}
    return type(pair)(**{k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 else v
                         for k, v in fields.items()})


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class Collectives:
    """Records the collectives one call of a step issues (which, sizes, groups) and replays them alone,
    back to back: the time the transfers take without the waits for compute that the NCCL kernels of a
    real step include."""

    NAMES = ("all_to_all_single", "all_gather", "batch_isend_irecv", "all_reduce")

    def __init__(self):
        self.calls: list[tuple] = []

    def record(self, step) -> None:
        real = {name: getattr(dist, name) for name in self.NAMES}

        def a2a(output, input, *args, group=None, **kw):
            self.calls.append(("a2a", input.shape, input.dtype, group))
            return real["all_to_all_single"](output, input, *args, group=group, **kw)

        def gather(tensor_list, tensor, group=None, **kw):
            self.calls.append(("gather", tensor.shape, tensor.dtype, group, len(tensor_list)))
            return real["all_gather"](tensor_list, tensor, group=group, **kw)

        def reduce(tensor, *args, group=None, **kw):
            self.calls.append(("reduce", tensor.shape, tensor.dtype, group))
            return real["all_reduce"](tensor, *args, group=group, **kw)

        def p2p(ops):
            self.calls.append(("p2p", [(op.op, op.tensor.shape, op.tensor.dtype, op.peer, op.group) for op in ops]))
            return real["batch_isend_irecv"](ops)

        for name, fake in zip(self.NAMES, (a2a, gather, p2p, reduce)):
            setattr(dist, name, fake)
        try:
            step()
        finally:
            for name, fn in real.items():
                setattr(dist, name, fn)

    def replay(self, device: torch.device) -> float:
        def new(shape, dtype):
            return torch.empty(shape, dtype=dtype, device=device)

        bufs = []
        for call in self.calls:  # buffers first: the timing is the transfers only
            if call[0] == "a2a":
                bufs.append((new(call[1], call[2]), new(call[1], call[2])))
            elif call[0] == "gather":
                bufs.append(([new(call[1], call[2]) for _ in range(call[4])], new(call[1], call[2])))
            elif call[0] == "reduce":
                bufs.append(torch.zeros(call[1], dtype=call[2], device=device))
            else:
                bufs.append([dist.P2POp(op, new(shape, dtype), peer, group) for op, shape, dtype, peer, group
                             in call[1]])
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        dist.barrier()
        sync()
        start = time.perf_counter()
        for call, buf in zip(self.calls, bufs):
            if call[0] == "a2a":
                dist.all_to_all_single(buf[0], buf[1], group=call[3])
            elif call[0] == "gather":
                dist.all_gather(buf[0], buf[1], group=call[3])
            elif call[0] == "reduce":
                dist.all_reduce(buf, group=call[3])
            else:
                for work in dist.batch_isend_irecv(buf):
                    work.wait()
        sync()
        return time.perf_counter() - start


def kernel_times(step) -> tuple[float, float]:
    """(NCCL kernels' seconds, all kernels' seconds) in one profiled call of `step` (CUDA)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    comm = sum(e.time_range.elapsed_us() for e in kernels if "nccl" in e.name.lower())
    return comm / 1e6, sum(e.time_range.elapsed_us() for e in kernels) / 1e6


def rank_run(rank: int, world: int, port: int, job: dict, out: str) -> None:
    """One rank of one configuration: build, warm up, time `reps` steps; rank 0 writes the median."""

    from ditserve.config import ParallelConfig
    from ditserve.models.common.dit import StepContext
    from ditserve.parallel.cfg import cfg_parallel
    from ditserve.parallel.groups import init_groups
    from ditserve.sampling.guidance import ClassifierFree

    cuda = job["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    groups = init_groups(ParallelConfig(num_gpus=world, **job["degrees"]), device)
    sc = job["scenario"]
    dit, inputs = build(job["model"], sc, groups, device, getattr(torch, job["dtype"]))
    guidance = cfg_parallel(ClassifierFree(torch.tensor([4.0])), groups.cfg)

    last = {}

    def call(x_in, branches):
        ctx = StepContext(0, 1, 0, tuple(branches), tuple({} for _ in branches))
        last["branches"], last["pred"] = tuple(branches), dit(inputs[tuple(branches)], ctx)
        return last["pred"]

    x = torch.zeros(1, device=device)
    times = []
    with torch.no_grad():
        for i in range(job["warmup"] + job["reps"]):
            dist.barrier()
            start = time.perf_counter()
            guided = guidance.predict(call, x)
            if cuda:
                torch.cuda.synchronize()
            if i >= job["warmup"]:
                times.append(time.perf_counter() - start)
        comm, alone = (None, None), None
        if world > 1:
            collectives = Collectives()
            collectives.record(lambda: guidance.predict(call, x))
            alone = collectives.replay(device)
            if cuda:
                try:
                    comm = kernel_times(lambda: guidance.predict(call, x))
                except RuntimeError as exc:  # the profiler is a diagnostic: the timing stands without it
                    log.warning("no kernel profile: %s", exc)
    if rank == 0:
        result = {"step_s": statistics.median(times), "comm_s": comm[0], "kernel_s": comm[1],
                  "comm_alone_s": alone, "collectives": len(collectives.calls) if world > 1 else 0}
        ref = Path(job["reference"])
        pred = last["pred"].cpu()  # the branches this rank predicted, in the last timed step
        if not job["degrees"]:
            torch.save({"pred": pred, "guided": guided.cpu()}, ref)
            # the floor: what changing only the batch size (2 -> 1, as CFG-parallel does) moves the prediction
            with torch.no_grad():
                result["rel_l2_batch_floor"] = rel_l2(call(x, BOTH[:1]).cpu(), pred[:1])
        elif ref.exists() and not groups.tp.size > 1:
            single = torch.load(ref)
            result["rel_l2"] = rel_l2(pred, single["pred"][[BOTH.index(b) for b in last["branches"]]])
            result["rel_l2_guided"] = rel_l2(guided.cpu(), single["guided"])
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def run_job(job: dict, world: int) -> dict:
    """Start `world` ranks for one configuration; what rank 0 measured (median step time, the
    profiled step's kernel times, the distance from the reference output)."""
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False)  # an OS-chosen port
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(rank_run, args=(world, store.port, job, out), nprocs=world, start_method="spawn")
        return json.loads(Path(out).read_text())


def bench_model(model: str, sc: Scenario, counts: list[int], args, save=lambda rows: None) -> list[dict]:
    """Every configuration of `model` that fits `counts` (1 first: the reference); `save(rows)` after each."""
    from ditserve.bench.common import arch_kwargs, architectures, base_row

    heads = (sc.arch or arch_kwargs(architectures()[model]["transformer"]))["num_attention_heads"]
    shape = f"{sc.width}x{sc.height}" + (f"x{sc.frames}" if sc.frames else "")
    rows = []
    reference = Path(args.workdir) / f"{model}.pt"
    reference.unlink(missing_ok=True)
    for n in counts:
        for mode in ("single", *(m for m in (args.modes or sc.modes))):
            kw = degrees(mode, n)
            if kw is None or heads % (kw.get("ulysses_degree", 1) * kw.get("tp_size", 1)):
                continue
            job = dict(model=model, scenario=sc, degrees=kw, device=args.device, dtype=args.dtype,
                       warmup=args.warmup, reps=args.reps, reference=str(reference))
            got = run_job(job, n)
            row = base_row(model, args.dtype, shape) | dict(num_gpus=n, mode=mode, step_s=round(got["step_s"], 5))
            row |= {k: round(got[k], 5) for k in ("comm_s", "kernel_s", "comm_alone_s") if got.get(k) is not None}
            row["collectives"] = got["collectives"]
            row |= {k: float(f"{got[k]:.3g}") for k in ("rel_l2", "rel_l2_guided", "rel_l2_batch_floor") if k in got}
            single = rows[0]["step_s"] if rows else row["step_s"]
            rows.append(row | {"speedup": round(single / row["step_s"], 3)})
            save(rows)
            log.info("%s %s x%d: %.4f s/step, %s", model, mode, n, got["step_s"],
                     {k: v for k, v in got.items() if k != "step_s"})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(SCENARIOS)} (default all)")
    p.add_argument("--max-gpus", type=int, default=8)
    p.add_argument("--counts", default="1,2,4,8", help="GPU counts to run (up to --max-gpus; 1, the reference, "
                                                         "always runs)")
    p.add_argument("--modes", default=None, help="comma-separated modes instead of each scenario's")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on tiny models over gloo")
    args = p.parse_args(argv)
    args.modes = args.modes.split(",") if args.modes else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    known = TINY if args.tiny else SCENARIOS
    scenarios = {m: known[m] for m in (args.models.split(",") if args.models else known)}
    if args.tiny:
        args.device, args.dtype, args.max_gpus = "cpu", "float32", min(args.max_gpus, 2)
        args.reps, args.warmup = min(args.reps, 2), min(args.warmup, 1)
    else:
        args.device, args.max_gpus = "cuda", min(args.max_gpus, torch.cuda.device_count())
    counts = sorted({1} | {int(n) for n in args.counts.split(",") if int(n) <= args.max_gpus})
    done: list[dict] = []

    def save(rows: list[dict]) -> None:  # after every configuration: a run cut short keeps what it finished
        if args.out:
            Path(args.out).write_text(json.dumps(done + rows, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        for model, sc in scenarios.items():
            done += bench_model(model, sc, counts, args, save)
    rows = done
    for row in rows:
        log.info("%-16s %-12s x%d  %.4f s  speedup %s  rel_l2 %s  comm %s s", row["model"], row["mode"],
                 row["num_gpus"], row["step_s"], row["speedup"], row.get("rel_l2"), row.get("comm_s"))
    return rows


if __name__ == "__main__":
    main()
