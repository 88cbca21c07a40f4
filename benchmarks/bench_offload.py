"""Offload on the GPU: one DiT step and its peak memory, ditserve's layerwise offload (every block
streamed; and with a GPU memory budget, the first blocks resident) side by side with diffusers' own
group offload (`enable_group_offload`, block level, one block per group, CUDA streams) on the same
random weights at real size, in the same run, against the resident step.

A step is one DiT call at the checkpoint's default size, batch 1 (the issue's table): FLUX.1-dev
1024² (4096 + 512 tokens), Wan2.1-T2V-1.3B 480p x 81, Wan2.1-T2V-14B 720p x 81. Weights start in
host memory (pinned: ours through accel/offload.py's copies, diffusers' through its own hooks), the
inputs on the GPU; the peak is `torch.cuda.max_memory_allocated` over the timed calls. Every mode's
output is checked against the resident one (`max_abs_diff_vs_resident`: streaming changes no value).

    python benchmarks/bench_offload.py --model flux.1-dev [--budget 12] [--out FILE]
    python benchmarks/bench_offload.py --model wan2.1-t2v-14b --budget 12 --out FILE
    python benchmarks/bench_offload.py --model wan2.1-t2v-1.3b --compile --out FILE   # each side compiled
    python benchmarks/bench_offload.py --model flux.1-dev --tiny      # CPU smoke run at toy size

`--compile` compares each side at its best rather than eager against eager: ours gets the engine's
`--enable-torch-compile` (accel/compile.py: each block and the head compiled in place, fullgraph; the
layerwise streaming then wraps the compiled blocks' calls, as accel/offload.py does in the engine, and
CUDA graphs stay off as under any offload), diffusers' model `compile_repeated_blocks` (regional
compile of its transformer blocks). diffusers' resident run is then timed too
(`diffusers_resident_step_s`, fullgraph). Under group offload diffusers' hooks run inside each block's
compiled call and their onload/offload are `torch.compiler.disable`d, which fullgraph refuses: there it
compiles with `fullgraph=False`, breaking the graph at the hooks (as diffusers' own group offload +
compile test, whose dynamo cache limit of 10000 is set here). The resident row is then the compiled
resident step (`resident_step_s`), each layerwise row's `max_abs_diff_vs_resident` is compiled against
compiled, every row says `"compile": true`, and the warm-up (default 3 calls) covers the compile and
diffusers' recompile after its first call (its prefetch order is set up then). Chunked blocks share
one graph per block type (accel/activations.py: a chunked feed-forward changes class rather than
getting a per-instance forward).

Under layerwise offload the DiT's per-token parts run in chunks of `--forward-chunk-size` tokens (default
4096, as the engine's automatic setting; 0 off): every block streamed chunked (the least memory) and, when
chunking, unchunked (what streaming alone costs); at the budget the chunk is dropped as the engine drops its
automatic one, when the unchunked activations leave as many blocks resident. The budget keeps the
estimated activation peak free (accel/activations.py's estimate on a meta copy at the same size:
`activation_est_gib`, beside the resident `activation_est_resident_gib`; the measured peak minus the
resident weights shows how close it is).
End to end, the budget is planned as the engine plans it, around the DiT's first call's estimate
(`budget_planned_activation_gib`, `resident_blocks`).

Rows (one per ditserve mode): model, gpu, offload, gpu_memory_budget_gib, step_s, resident_step_s,
diffusers_offload_step_s, diffusers_offload_peak_mem_gib, diffusers_resident_step_s (`--compile`),
peak_mem_gib, forward_chunk_size, activation_est_gib, compile, commit. With `--end-to-end`
(Wan), "end_to_end": the WanPipeline on random weights — UMT5 for the prompt and "" , `--e2e-steps`
CFG steps, VAE decode (eager, also under `--compile`) — resident and under `--cpu-offload layerwise
--gpu-memory-budget`: e2e_s,
resident_e2e_s, e2e_peak_mem_gib (the largest stage peak), the frames' difference (0 expected).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ditserve.accel.activations import (  # noqa: E402
    apply_forward_chunking,
    disable_forward_chunking,
    estimate_activation_peak,
    meta_copy,
)
from ditserve.accel.offload import GIB, HostCopy, nbytes, resident_blocks, stream_blocks, to_device  # noqa: E402
from ditserve.bench.common import arch_kwargs, architectures, base_row, wall_time  # noqa: E402
from ditserve.bench.wan_e2e import TINY_WAN, random_text_and_vae  # noqa: E402

log = logging.getLogger("bench_offload")

SIZES = {  # height, width, frames (1: an image); text tokens
    "flux.1-dev": ((1024, 1024, 1), 512),
    "wan2.1-t2v-1.3b": ((480, 832, 81), 512),
    "wan2.1-t2v-14b": ((720, 1280, 81), 512),
}
TINY_SIZES = {"flux.1-dev": ((64, 64, 1), 8), "wan2.1-t2v-1.3b": ((32, 32, 5), 8), "wan2.1-t2v-14b": ((32, 32, 5), 8)}
TINY_ARCH = {
    "flux.1-dev": dict(cls="FluxTransformer2DModel", patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20,
                       guidance_embeds=True, axes_dims_rope=[4, 6, 6]),
    "wan2.1-t2v-1.3b": TINY_WAN,
    "wan2.1-t2v-14b": TINY_WAN,
}


@dataclass
class Case:
    ref: torch.nn.Module  # diffusers' model
    ours: torch.nn.Module
    inp: object  # ours' input for one step
    ref_kwargs: dict
    shape: str


def build_case(model: str, tiny: bool, device: str, dtype: torch.dtype) -> Case:
    """diffusers' model with random weights and ours holding the same values, both on `device`,
    with one step's inputs."""
    from ditserve.bench.common import random_pair

    arch = arch_kwargs(TINY_ARCH[model] if tiny else architectures()[model]["transformer"])
    (height, width, frames), txt_len = (TINY_SIZES if tiny else SIZES)[model]
    if model.startswith("flux"):
        from diffusers import FluxTransformer2DModel

        from ditserve.bench import flux
        from ditserve.models.flux.config import FluxConfig
        from ditserve.models.flux.model import FluxDiT
        from ditserve.models.flux.weights import flux_key_map

        cfg = FluxConfig.from_dict(arch)
        ref, ours = random_pair(FluxTransformer2DModel, arch, FluxDiT, cfg, flux_key_map(cfg), device, dtype)
        inp = flux.inputs(cfg, height, width, txt_len, device, dtype)
        kwargs = dict(hidden_states=inp.img, encoder_hidden_states=inp.txt, pooled_projections=inp.pooled,
                      timestep=inp.timesteps, img_ids=inp.img_ids, txt_ids=inp.txt_ids, guidance=inp.guidance)
        inp = replace(inp, rope=ours.positional_tables(inp.img_ids, inp.txt_ids))
        return Case(ref, ours, inp, kwargs, f"{width}x{height}, {inp.img.shape[1]}+{txt_len} tokens")
    from diffusers import WanTransformer3DModel

    from ditserve.bench import wan
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.model import WanDiT, WanInputs
    from ditserve.models.wan.weights import wan_key_map

    cfg = WanConfig.from_dict(arch)
    ref, ours = random_pair(WanTransformer3DModel, arch, WanDiT, cfg, wan_key_map(cfg), device, dtype)
    cond = wan.inputs(cfg, height, width, frames, device, dtype)
    grid = ours.grid(cond.latents.shape)
    inp = WanInputs(latents=cond.latents, timesteps=cond.timesteps, context=cond.context,
                    rope=ours.positional_tables(grid, device))
    kwargs = dict(hidden_states=cond.latents, timestep=cond.timesteps, encoder_hidden_states=cond.context)
    return Case(ref, ours, inp, kwargs, f"{width}x{height}x{frames}, {grid[0] * grid[1] * grid[2]} tokens")


def activation_estimate(model: str, tiny: bool, dtype: torch.dtype, chunk: int | None) -> float:
    """GiB: the activation peak of one DiT step at the bench's size (accel/activations.py), on a meta
    copy of the DiT, with its per-token parts in chunks of `chunk` tokens (None: whole)."""
    arch = arch_kwargs(TINY_ARCH[model] if tiny else architectures()[model]["transformer"])
    (height, width, frames), txt_len = (TINY_SIZES if tiny else SIZES)[model]
    if model.startswith("flux"):
        from ditserve.bench import flux
        from ditserve.models.flux.config import FluxConfig
        from ditserve.models.flux.model import FluxDiT

        cfg = FluxConfig.from_dict(arch)
        dit = meta_copy(FluxDiT, cfg, dtype)
        inp = to_device(flux.inputs(cfg, height, width, txt_len, "cpu", dtype), torch.device("meta"))
    else:
        from ditserve.bench import wan
        from ditserve.models.wan.config import WanConfig
        from ditserve.models.wan.model import WanDiT

        cfg = WanConfig.from_dict(arch)
        dit = meta_copy(WanDiT, cfg, dtype)
        inp = to_device(wan.inputs(cfg, height, width, frames, "cpu", dtype), torch.device("meta"))
    if chunk:
        apply_forward_chunking(dit, chunk)
    peak = estimate_activation_peak(dit, inp)
    log.info("%s: estimated activation peak %.2f GiB over %d tokens (%.0f bytes a token), chunk %s", model,
             peak.peak_gib, peak.tokens, peak.per_token, chunk)
    return peak.peak_gib


def timed(fn, device: torch.device, warmup: int, reps: int) -> tuple[float, float | None, torch.Tensor]:
    """(median seconds, peak GiB over the timed calls (CUDA; None on CPU), last output)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds, out = wall_time(fn, reps)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return seconds, peak, out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


DYNAMO_CACHE_SIZE_LIMIT = 10000  # as diffusers' group offload + compile test: hooks and chunking recompile


def plan_rows(dit, group_size: int, budget: float, chunk: int | None, whole_gib: float, chunked_gib: float,
              tiny: bool) -> list[tuple[str, float | None, int | None]]:
    """The layerwise rows, as (offload, budget GiB, forward chunk), chunked ones first: every block streamed
    with `chunk` (the least memory) and, when chunking, unchunked too (streaming's own cost); at the budget
    as the engine plans it with the automatic chunk, which it drops when the unchunked activations leave
    as many blocks resident (accel/offload.py's first-call plan; the toy model always keeps `chunk`)."""
    budget_chunk = chunk
    if chunk and not tiny:
        kept = resident_blocks(dit, group_size, budget, whole_gib)
        if kept and kept >= resident_blocks(dit, group_size, budget, chunked_gib):
            budget_chunk = None
    rows = [("layerwise", None, chunk), ("layerwise", budget, budget_chunk)]
    if chunk:
        rows.append(("layerwise", None, None))
    return sorted(rows, key=lambda r: r[2] is None)  # stable: the chunked rows first


def bench(args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    case = build_case(args.model, args.tiny, str(device), dtype)
    ours, ref = case.ours, case.ref
    if args.compile:  # as the engine under --enable-torch-compile: compiled before any offload wraps it
        from ditserve.accel.compile import apply_compile

        torch._dynamo.config.cache_size_limit = DYNAMO_CACHE_SIZE_LIMIT
        apply_compile(ours)
    else:  # eager as the engine runs it: on CUDA, the fused QK-norm + RoPE (FLUX) and the token kernels (Wan)
        from ditserve.accel import accelerate_dit
        from ditserve.config import AccelConfig

        ours = accelerate_dit(ours, AccelConfig(), device)
    weights_gib = nbytes([ours]) / GIB
    ref.to("cpu")  # diffusers' side waits on the host while ours runs (and counts in no peak of ours)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run = lambda: ours(case.inp)  # noqa: E731
    with torch.no_grad():
        resident_s, resident_peak, expected = timed(run, device, args.warmup, args.reps)
    expected = expected.clone()
    chunk = args.forward_chunk_size or None
    resident_est = activation_estimate(args.model, args.tiny, dtype, None)
    chunked_est = activation_estimate(args.model, args.tiny, dtype, chunk) if chunk else resident_est
    budget = args.budget
    if args.tiny:  # the toy model is KiBs: a budget that keeps some blocks resident
        from ditserve.accel.offload import ACTIVATION_RESERVE_GIB

        blocks = nbytes(list(ours.blocks))
        budget = ACTIVATION_RESERVE_GIB + (nbytes([ours]) - blocks / 10) / GIB
    modes = plan_rows(ours, args.group_size, budget, chunk, resident_est, chunked_est, args.tiny)
    results = []
    applied = None
    for offload, gib, row_chunk in modes:
        if row_chunk != applied:  # chunked rows first: compiled, each change of chunking recompiles the blocks
            disable_forward_chunking(ours)
            if row_chunk:
                apply_forward_chunking(ours, row_chunk)
            applied = row_chunk
        est = chunked_est if row_chunk else resident_est
        ours.to("cpu")
        gc.collect()
        streamer = stream_blocks(ours, device, args.group_size, gib, activation_gib=None if args.tiny else est)
        rest = HostCopy([ours], device.type == "cuda",
                        frozenset(i for c in (streamer.copies if streamer else []) for i in c.tensor_ids()))
        rest.to_device(device)  # embed, head and the resident blocks
        with torch.no_grad():
            step_s, peak, out = timed(run, device, args.warmup, args.reps)
        results.append((offload, gib, row_chunk, est, step_s, peak, _diff(out, expected),
                        len(streamer.copies) if streamer else 0))
        if streamer is not None:
            streamer.remove()
        rest.to_host()
    disable_forward_chunking(ours)
    ours.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    diffusers_s = diffusers_peak = diffusers_resident_s = None
    ref_run = lambda: ref(**case.ref_kwargs, return_dict=False)[0]  # noqa: E731
    if not args.no_diffusers:
        if args.compile:  # diffusers' compiled resident step, beside ours
            ref.to(device)
            ref.compile_repeated_blocks(fullgraph=True)
            with torch.no_grad():
                diffusers_resident_s, _, _ = timed(ref_run, device, args.warmup, args.reps)
            ref.to("cpu")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        ref.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                 use_stream=device.type == "cuda")
        if args.compile:  # the hooks now run inside each block's call: graph breaks at their onload/offload
            ref.compile_repeated_blocks(fullgraph=False)
        with torch.no_grad():
            diffusers_s, diffusers_peak, _ = timed(ref_run, device, args.warmup, args.reps)
    base = base_row(args.model, str(dtype).removeprefix("torch."), case.shape)
    rows = [{**base, "offload": "none", "gpu_memory_budget_gib": None, "step_s": resident_s,
             "resident_step_s": resident_s, "diffusers_offload_step_s": diffusers_s,
             "diffusers_offload_peak_mem_gib": diffusers_peak, "peak_mem_gib": resident_peak,
             "max_abs_diff_vs_resident": 0.0, "streamed_groups": 0, "forward_chunk_size": None,
             "activation_est_gib": resident_est, "diffusers_resident_step_s": diffusers_resident_s,
             "compile": args.compile}]
    for offload, gib, row_chunk, est, step_s, peak, diff, groups in results:
        rows.append({**base, "offload": offload, "gpu_memory_budget_gib": gib, "step_s": step_s,
                     "resident_step_s": resident_s, "diffusers_offload_step_s": diffusers_s,
                     "diffusers_offload_peak_mem_gib": diffusers_peak, "peak_mem_gib": peak,
                     "max_abs_diff_vs_resident": diff, "streamed_groups": groups, "forward_chunk_size": row_chunk,
                     "activation_est_gib": est, "diffusers_resident_step_s": diffusers_resident_s,
                     "compile": args.compile,
                     "over_diffusers": None if not diffusers_s else step_s / diffusers_s})
    return {"model": args.model, "gpu": base["gpu"], "commit": base["commit"], "shape": case.shape,
            "weights_gib": weights_gib, "group_size": args.group_size, "activation_est_resident_gib": resident_est,
            "activation_est_gib": chunked_est, "compile": args.compile, "rows": rows}


def wan_pipeline(model: str, tiny: bool, device: str, dtype: torch.dtype, folder: Path):
    """A WanPipeline (text-to-video, one DiT) of random weights at real size on `device`: UMT5, the
    Wan 2.1 VAE (ditserve/bench/wan_e2e.py's, TINY_E2E's with `tiny`), the DiT; tokenizer and scheduler
    written to `folder`."""
    from ditserve.encoders.umt5 import UMT5Encoder
    from ditserve.pipelines.wan import WanPipeline
    from ditserve.sampling.scheduler_config import read_scheduler_config

    arch = architectures()[model]
    case = build_case(model, tiny, device, dtype)
    del case.ref
    scheduler = {"_class_name": arch["scheduler"]["cls"], **arch_kwargs(arch["scheduler"])}
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    tokenizer, text, vae = random_text_and_vae(model, tiny, device, dtype, folder)
    return WanPipeline(case.ours, None, UMT5Encoder(tokenizer, text), vae,
                       read_scheduler_config(folder / "scheduler" / "scheduler_config.json"), None, False,
                       torch.device(device), dtype)


def bench_end_to_end(args) -> list[dict]:
    """Wan text-to-video end to end (UMT5 for prompt and negative prompt, `--e2e-steps` CFG steps of the
    DiT, VAE decode), resident and then with `--cpu-offload layerwise` at `--budget`: wall time and the
    largest per-stage peak (Timings.peak_memory_gib)."""
    import tempfile

    from ditserve.accel.offload import apply_memory
    from ditserve.api import GenerationRequest
    from ditserve.config.memory import MemoryConfig
    from ditserve.pipelines.base import RunControl
    from ditserve.pipelines.wan import WanPipeline

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    pipe = wan_pipeline(args.model, args.tiny, str(device), dtype, Path(tempfile.mkdtemp()))
    (height, width, frames), _ = (TINY_SIZES if args.tiny else SIZES)[args.model]
    req = GenerationRequest(prompt="a cat walks on the grass", negative_prompt="", height=height, width=width,
                            num_frames=frames, num_inference_steps=args.e2e_steps, seed=0, guidance_scale=5.0,
                            max_sequence_length=64 if args.tiny else 512)
    req = req.resolve(WanPipeline.defaults, WanPipeline.limits)
    run = lambda: pipe.run([req], RunControl())  # noqa: E731

    def measure():
        run()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        frames_out, timings = run()
        wall = time.perf_counter() - start
        peak = max(timings.peak_memory_gib.values()) if timings.peak_memory_gib else None
        return wall, peak, frames_out.videos

    resident_s, resident_peak, expected = measure()
    for module in pipe.components().values():
        module.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # the toy DiT is KiBs: a budget it fits twice over, so that the first call's plan makes it resident
    budget = args.budget if not args.tiny else 0.3 + 2 * nbytes([pipe.dit]) / GIB
    chunk = args.forward_chunk_size or None
    resident_est = activation_estimate(args.model, args.tiny, dtype, None)
    chunked_est = activation_estimate(args.model, args.tiny, dtype, chunk) if chunk else resident_est
    batch = 2  # CFG runs both branches as one batch of 2: twice a step's activations
    # as the engine does: the budget is planned at the DiT's first call around that call's estimate
    offloader = apply_memory(pipe, MemoryConfig(cpu_offload="layerwise", offload_group_size=args.group_size,
                                                gpu_memory_budget_gib=budget,
                                                forward_chunk_size=args.forward_chunk_size), device)
    e2e_s, peak, videos = measure()
    planned = offloader.activation_gib.get("transformer")
    base = base_row(args.model, str(dtype).removeprefix("torch."), f"{width}x{height}x{frames}")
    return [{**base, "offload": "layerwise", "gpu_memory_budget_gib": budget, "e2e_steps": args.e2e_steps,
             "compile": False,  # eager, with or without --compile
             "e2e_s": e2e_s, "resident_e2e_s": resident_s, "e2e_peak_mem_gib": peak,
             "resident_e2e_peak_mem_gib": resident_peak, "forward_chunk_size": chunk,
             "activation_est_gib": batch * chunked_est, "activation_est_resident_gib": batch * resident_est,
             "budget_planned_activation_gib": planned,
             "resident_blocks": len(pipe.dit.blocks) - (offloader.streamers["transformer"].blocks
                                                        if "transformer" in offloader.streamers else 0),
             "max_abs_diff_vs_resident": int(abs(videos.astype(int) - expected.astype(int)).max())}]


def table(rows: list[dict]) -> str:
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = ["offload     budget  step_s  peak_GiB  diffusers_step_s  diffusers_peak_GiB  x_diffusers  diff"]
    for r in rows:
        lines.append(f"{r['offload']:<10} {f(r['gpu_memory_budget_gib'], '.1f'):>7} {f(r['step_s']):>7} "
                     f"{f(r['peak_mem_gib'], '.2f'):>9} {f(r['diffusers_offload_step_s']):>17} "
                     f"{f(r['diffusers_offload_peak_mem_gib'], '.2f'):>19} {f(r.get('over_diffusers'), '.2f'):>12} "
                     f"{r['max_abs_diff_vs_resident']:.1e}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SIZES), default="flux.1-dev")
    p.add_argument("--budget", type=float, default=12.0, help="GiB for the budgeted layerwise row (default 12)")
    p.add_argument("--group-size", type=int, default=1, help="blocks per streamed group (default 1)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-diffusers", action="store_true", help="skip diffusers' group offload")
    p.add_argument("--end-to-end", action="store_true",
                   help="Wan: also UMT5 + --e2e-steps CFG steps + VAE decode, resident and layerwise at --budget")
    p.add_argument("--e2e-steps", type=int, default=2, help="denoising steps of the end-to-end run (default 2)")
    p.add_argument("--only-end-to-end", action="store_true", help="the end-to-end rows alone (a device call each)")
    p.add_argument("--forward-chunk-size", type=int, default=4096, metavar="TOKENS",
                   help="layerwise rows: the DiT's per-token parts in chunks of this many tokens (default 4096, "
                        "the engine's automatic value under layerwise; 0 off)")
    p.add_argument("--compile", action="store_true",
                   help="each side compiled: ours per block as the engine's --enable-torch-compile, diffusers' "
                        "compile_repeated_blocks; the resident row is the compiled resident (default warm-up 3)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at toy size")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    big = args.model == "wan2.1-t2v-14b" and not args.tiny  # ≈ 12 s a step
    # compiling: the first call compiles, diffusers' second recompiles (its prefetch hooks change after the first)
    default_warmup = 3 if args.compile else 1 if args.tiny or big else 2
    args.warmup = args.warmup if args.warmup is not None else default_warmup
    args.reps = args.reps if args.reps is not None else (2 if args.tiny or big else 5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.only_end_to_end:
        args.end_to_end = True
    result = {"model": args.model} if args.only_end_to_end else bench(args)
    if args.end_to_end and args.model.startswith("wan"):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        result["end_to_end"] = bench_end_to_end(args)
        if args.out:  # the step rows are kept should the end-to-end run fail
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "rows" in result:
        sys.stdout.write(f"{result['model']} on {result['gpu']} at {result['commit']}, {result['shape']}, "
                         f"{result['weights_gib']:.2f} GiB of weights, "
                         f"{'compiled' if result['compile'] else 'eager'}\n" + table(result["rows"]))
    if "rows" in result and result["rows"][0]["diffusers_resident_step_s"] is not None:
        sys.stdout.write(f"diffusers resident (compiled): {result['rows'][0]['diffusers_resident_step_s']:.3f} s\n")
    for row in result.get("end_to_end", []):
        sys.stdout.write(f"end to end, {row['e2e_steps']} steps: resident {row['resident_e2e_s']:.2f} s, "
                         f"layerwise at {row['gpu_memory_budget_gib']} GiB {row['e2e_s']:.2f} s, peak "
                         f"{row['e2e_peak_mem_gib']} GiB (resident {row['resident_e2e_peak_mem_gib']}); DiT "
                         f"activations estimated {row['activation_est_gib']:.2f} GiB chunked, "
                         f"{row['activation_est_resident_gib']:.2f} GiB whole\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
