#!/usr/bin/env bash
# Issue 26's runs on a machine of 2 GPUs (device kind nvidia-h200-x2), one part per call (under 10 min);
# on 4 or 8 GPUs set COUNTS (e.g. COUNTS=1,4 then COUNTS=8: the 1-GPU reference runs in every call):
#   images:   FLUX.1-dev 1024² true CFG and Qwen-Image 1328² on 1 and 2 GPUs (CFG-parallel, Ulysses), then
#             the degree-1 executor cost and the throughput of 2 replicas (Wan2.1-1.3B-size DiT, 10 steps)
#   wan14b:   Wan2.1-T2V-14B 720p x 81 (75,600 tokens) on 1 and 2 GPUs (CFG-parallel, Ulysses, Ring)
# Every row carries rel_l2 against the 1-GPU output and, on 2 GPUs, the NCCL kernel time of a profiled step.
# Usage (device `run`, kind nvidia-h200-x2, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_parallel.sh PART
# Results: $OUT/parallel_{images,wan14b}_h200x<GPUs>.json, parallel_overhead_h200.json (+ .log); commit them under
# benchmarks/results/.
source benchmarks/gpu_part.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule: no multicast
show() { grep -E "bench_parallel[^ ]*: [a-z].* x[0-9]|^ *\"(throughput|overhead|max_pixel|in_process_median|executor_median)|Error|error:|Traceback" | tail -30; }
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
echo "$ngpu GPUs"
nvidia-smi topo -m 2>/dev/null | head -4

if [ "$part" = images ]; then
    timeout 240 python3 benchmarks/bench_parallel.py --models flux.1-dev,qwen-image --counts "${COUNTS:-1,2}" --reps 5 \
        --out "$out/parallel_images_h200x${ngpu}.json" 2>&1 | tee "$out/parallel_images_h200x${ngpu}.log" | show
    timeout 320 python3 benchmarks/bench_parallel_overhead.py --steps 10 --reps 2 --replicas 2 --requests 4 \
        --out "$out/parallel_overhead_h200.json" 2>&1 | tee "$out/parallel_overhead_h200.log" | show
fi
if [ "$part" = wan14b ]; then  # a 1-GPU CFG step (batch of two) is ≈ 24 s: 1 warm-up + 2 timed per mode
    timeout 580 python3 benchmarks/bench_parallel.py --models wan2.1-t2v-14b --counts "${COUNTS:-1,2}" --reps 2 --warmup 1 \
        --out "$out/parallel_wan14b_h200x${ngpu}.json" 2>&1 | tee "$out/parallel_wan14b_h200x${ngpu}.log" | show
fi
