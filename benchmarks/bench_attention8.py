"""bf16 SDPA vs the "fp8" attention backend (ditserve/accel/attention8.py: Triton quantisation with
K and V smoothing + cuDNN's fp8 SDPA + Triton epilogue) at FLUX, Qwen-Image, Wan, SD3.5-Large and
CogVideoX-5B shapes (the last two with 64-wide heads, as a CFG batch of two).

Per shape: time of bf16 SDPA and of the whole fp8 op (quantisation included), eager and replayed
as a CUDA graph (launch gaps out), the parts alone (quantise q, k, v; the cuDNN kernel; the
epilogue), TFLOP/s (4·B·H·S²·D), and rel L2 against bf16 SDPA for i.i.d. Gaussian inputs (the
2026-12-03 measurement's, per-tensor fp8 6.0e-2 there) and DiT-like ones (RMS-normed q, k with uneven
weights, a shared component in k and v). The FLUX row also checks the CPU emulation
(`attention_reference`) against cuDNN on the device. Beside them, every other attention kernel this
machine can run, timed the same way with its rel L2 on the DiT-like inputs (`others`): SDPA pinned to
its flash and memory-efficient kernels (SDPA's own choice on Hopper is cuDNN), and the "sage" / "fa3"
backends (ditserve/accel/attention.py) where installed. Writes JSON.

On the device machine (wheels in .whl/: nvidia-cudnn-frontend cp312):
    source benchmarks/gpu_setup.sh && python3 benchmarks/bench_attention8.py $OUT/attention8_h200.json
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from ditserve.accel import attention8 as a8
from ditserve.bench.common import commit, median_time, rel_l2
from ditserve.models.common.attention import sdpa_attention as sdpa

log = logging.getLogger("bench_attention8")
SHAPES = {"flux": (1, 4608, 24, 128), "qwen-image": (1, 7017, 24, 128),
          "wan-1.3b": (1, 32760, 12, 128), "wan-14b": (1, 75600, 40, 128),
          # 64-wide heads, where cuDNN's bf16 kernel runs at ≈ 381 TFLOP/s (CogVideoX's step profile)
          "sd3.5-large": (2, 4429, 38, 64), "cogvideox-5b": (2, 17776, 48, 64)}  # [B, S, H, D]


def dit_like(shape, gen, device: str = "cuda") -> tuple[torch.Tensor, ...]:
    """q, k RMS-normed with uneven weights (logit std ~1-2), a shared component in k and v."""
    b, s, h, d = shape

    def randn(*size):
        return torch.randn(*size, device=device, generator=gen)

    def normed(bias):
        x = randn(b, s, h, d) + bias * randn(1, 1, h, d)
        x[..., :4] *= 6.0  # outlier channels
        w = 0.9 * torch.exp(0.3 * randn(h, d))
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * w).bfloat16()

    v = (randn(b, s, h, d) + 0.7 * randn(1, 1, h, d)).bfloat16()
    return normed(0.5), normed(2.0), v


def graph_time(fn) -> float:
    """Median time of `fn` replayed as a CUDA graph (captured after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_time(graph.replay, 3, 20)


def other_kernels(device: str = "cuda") -> dict:
    """name -> attention op (q, k, v [B, S, H, D] -> out) for the kernels besides cuDNN SDPA and fp8."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ditserve.accel.attention import available, select_attention

    def pinned(backend):
        def op(q, k, v):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        return op

    ops = {"sdpa_flash": pinned(SDPBackend.FLASH_ATTENTION), "sdpa_efficient": pinned(SDPBackend.EFFICIENT_ATTENTION)}
    for name in ("sage", "fa3"):
        if available(name) and device == "cuda":
            ops[name] = select_attention(name, torch.device(device))
    return ops


def measure_others(shape, tflop: float, gen, device: str = "cuda") -> dict:
    """Time (eager) and rel L2 against SDPA on DiT-like inputs of each `other_kernels` op; a kernel that
    refuses the shape records its error."""
    qd, kd, vd = dit_like(shape, gen, device)
    ref = sdpa(qd, kd, vd)
    out = {}
    for name, op in other_kernels(device).items():
        try:
            ms = median_time(lambda op=op: op(qd, kd, vd), 3, 10) * 1e3
            out[name] = {"ms": ms, "tflops": tflop / (ms / 1e3), "rel_l2_dit_like": rel_l2(op(qd, kd, vd), ref)}
        except Exception as exc:  # noqa: BLE001 - a kernel refusing a shape is a result here
            out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


@torch.no_grad()
def measure(name: str, shape) -> dict:
    b, s, h, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    tflop = 4 * b * h * s * s * d / 1e12
    row = {"shape": name, "dims": list(shape), "tflop": tflop}
    row["sdpa_bf16_ms"] = median_time(lambda: sdpa(q, k, v), 3, 10) * 1e3
    try:
        op = a8.fp8_attention
        out = op(q, k, v)
        row["fp8_out_dtype"] = "e4m3" if a8._graph_for(q, k).fp8_out else "bf16"
        row["fp8_ms"] = median_time(lambda: op(q, k, v), 3, 10) * 1e3
        row["rel_l2_iid"] = rel_l2(out, sdpa(q, k, v))
        q8, dq, _ = a8.quantize_fp8(q, False)
        k8, dk, _ = a8.quantize_fp8(k, True)
        v8, dv, mv = a8.quantize_fp8(v, True)
        graph = a8._graph_for(q, k)
        so = 1.0 / dv if graph.fp8_out else graph.one
        o8 = graph(q8, k8, v8, dq, dk, dv, so)
        row["quantise_qkv_ms"] = median_time(lambda: (a8.quantize_fp8(q, False), a8.quantize_fp8(k, True),
                                                       a8.quantize_fp8(v, True)), 3, 10) * 1e3
        row["cudnn_kernel_ms"] = median_time(lambda: graph(q8, k8, v8, dq, dk, dv, so), 3, 10) * 1e3
        row["epilogue_ms"] = median_time(lambda: a8.dequantize_out(o8, dv, mv, q.dtype), 3, 10) * 1e3
        row["sdpa_bf16_graph_ms"] = graph_time(lambda: sdpa(q, k, v)) * 1e3
        row["fp8_graph_ms"] = graph_time(lambda: op(q, k, v)) * 1e3
        qd, kd, vd = dit_like(shape, gen)
        ref = sdpa(qd, kd, vd)
        row["rel_l2_dit_like"] = rel_l2(op(qd, kd, vd), ref)
        if name == "flux":  # the emulation the CPU study and unit tests rely on, against cuDNN
            emu = a8.attention_reference(qd, kd, vd, fp8_out=graph.fp8_out)
            row["rel_l2_emulation_vs_cudnn"] = rel_l2(op(qd, kd, vd), emu)
            row["rel_l2_emulation_vs_sdpa"] = rel_l2(emu, ref)
    except Exception as exc:  # noqa: BLE001 - a refusing cuDNN is a result here
        row["fp8_error"] = f"{type(exc).__name__}: {exc}"[:500]
    for key in [key for key in row if key.endswith("_ms")]:
        row[key.replace("_ms", "_tflops")] = tflop / (row[key] / 1e3)
    if "fp8_graph_ms" in row:
        row["speedup_graph"] = row["sdpa_bf16_graph_ms"] / row["fp8_graph_ms"]
    row["others"] = measure_others(shape, tflop, gen)
    return row


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out_path = sys.argv[1] if len(sys.argv) > 1 else "attention8.json"
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES)
    rows = []
    for name in names:
        rows.append(measure(name, SHAPES[name]))
        log.info("%s", json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    import cudnn

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
              "cudnn_frontend": getattr(cudnn, "__version__", "?"),
              "cudnn_backend": getattr(cudnn, "backend_version", lambda: None)(),
              "rows": rows}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
