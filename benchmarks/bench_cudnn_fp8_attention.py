"""Is cuDNN's fp8 attention (through the cudnn-frontend Python graph API) faster than its bf16
attention at FLUX.1-dev's and Qwen-Image's shapes on this GPU, and how wrong is it? SageAttention
(v1, Triton) is timed beside it when installed.

Why: attention is ≈ 25 ms of the 0.10 s fp8 FLUX step and stays bf16; our own 8-bit Triton kernel
lost to cuDNN's bf16 (benchmarks/results/attention_fp8_h200.json). cuDNN's fp8 kernel uses per-tensor
scales, and on Hopper writes its output in fp8 too (scale_o): the output here is scaled by
448 / amax(v), which cannot overflow (each output row is a convex combination of v's rows).

Not yet run (written after session 3's GPU time was spent). On the device machine, with the wheels
in .whl/ (nvidia-cudnn-frontend for cp312, sageattention 1.0.6):
    source benchmarks/gpu_setup.sh && python3 benchmarks/bench_cudnn_fp8_attention.py $OUT/cudnn_fp8_attention.json
"""

from __future__ import annotations

import json
import math
import sys

import torch

from ditserve.bench.common import median_time, rel_l2
from ditserve.models.common.attention import sdpa_attention as sdpa

E4M3 = torch.float8_e4m3fn
SHAPES = {"flux": (1, 4608, 24, 128), "qwen-image": (1, 7017, 24, 128)}  # [B, S, H, D]


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor e4m3: (x · 448/amax) in fp8 and the descale amax/448 as a [1, 1, 1, 1] float32."""
    amax = x.abs().amax().float().clamp(min=1e-12).reshape(1, 1, 1, 1)
    return (x.float() * (448.0 / amax)).to(E4M3), amax / 448.0


class CudnnFp8Attention:
    """One cuDNN fp8 SDPA graph for q, k, v [B, S, H, D] (viewed as B, H, S, D by strides)."""

    def __init__(self, shape: tuple[int, int, int, int]):
        import cudnn

        b, s, h, d = shape
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        dims, strides = [b, h, s, d], [s * h * d, d, h * d, 1]
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scalar = {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1], "data_type": fp32}
        self.scales = [graph.tensor(name=n, **scalar) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        kwargs = dict(zip(("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"), self.scales),
                      attn_scale=1.0 / math.sqrt(d), use_causal_mask=False, name="sdpa_fp8")
        try:
            outs = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, generate_stats=False, **kwargs)
        except TypeError:  # older frontends: is_inference instead of generate_stats
            outs = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, is_inference=True, **kwargs)
        self.o, _, self.amax_s, self.amax_o = outs
        self.o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)  # Hopper: fp8 O
        for amax in (self.amax_s, self.amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
        self.out8 = torch.empty(b, s, h, d, device="cuda", dtype=E4M3)
        self.amax_bufs = [torch.empty(1, 1, 1, 1, device="cuda") for _ in range(2)]
        one = torch.ones(1, 1, 1, 1, device="cuda")
        self.p_scale, self.p_descale = one * 448.0, one / 448.0  # P in [0, 1]

    def attend8(self, q8, k8, v8, dq, dk, dv, scale_o) -> torch.Tensor:
        """The kernel alone on fp8 operands; returns the fp8 output (times scale_o)."""
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: self.out8, self.amax_s: self.amax_bufs[0],
                self.amax_o: self.amax_bufs[1]}
        pack.update(zip(self.scales, (dq, dk, dv, self.p_descale, self.p_scale, scale_o)))
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.out8

    def __call__(self, q, k, v) -> torch.Tensor:
        """bf16 in, bf16 out: per-tensor quantisation, the kernel, the output rescaled."""
        (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
        scale_o = 1.0 / dv  # 448 / amax(v)
        return (self.attend8(q8, k8, v8, dq, dk, dv, scale_o).float() * dv).to(q.dtype)


@torch.no_grad()
def measure(name: str, shape: tuple[int, int, int, int]) -> dict:
    b, s, h, d = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sdpa(q, k, v)
    row = {"shape": name, "sdpa_bf16_ms": median_time(lambda: sdpa(q, k, v), 5, 25) * 1e3}
    try:
        attn = CudnnFp8Attention(shape)
        (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
        row["cudnn_fp8_rel_l2"] = rel_l2(attn(q, k, v), ref)
        row["cudnn_fp8_ms"] = median_time(lambda: attn(q, k, v), 5, 25) * 1e3
        row["cudnn_fp8_kernel_ms"] = median_time(lambda: attn.attend8(q8, k8, v8, dq, dk, dv, 1.0 / dv), 5, 25) * 1e3
    except Exception as exc:  # noqa: BLE001 - a missing or refusing cuDNN is a result here
        row["cudnn_fp8_error"] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        from sageattention import sageattn

        row["sage_rel_l2"] = rel_l2(sageattn(q, k, v, tensor_layout="NHD"), ref)
        row["sage_ms"] = median_time(lambda: sageattn(q, k, v, tensor_layout="NHD"), 5, 25) * 1e3
    except Exception as exc:  # noqa: BLE001
        row["sage_error"] = f"{type(exc).__name__}: {exc}"[:500]
    tflop = 4 * b * h * s * s * d / 1e12
    for key in [key for key in row if key.endswith("_ms")]:
        row[key.replace("_ms", "_tflops")] = tflop / (row[key] / 1e3)
    return row


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 else "cudnn_fp8_attention.json"
    rows = [measure(name, shape) for name, shape in SHAPES.items()]
    for row in rows:
        print(json.dumps(row))
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
