#!/usr/bin/env bash
# One device call (under 10 minutes) for issue 16's GPU speed numbers: step-cache computed / reused
# paths and per-image/video wall estimates, side by side with diffusers' first-block cache on the same
# random weights: FLUX.1-dev 1024² compiled bf16 and fp8 (one process: diffusers compiled once), then
# Wan2.1-T2V-1.3B 832x480x81 compiled bf16. Each part writes its JSON as it goes (a part cut off by
# its time limit keeps what it finished) and its full log beside it.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_cache.sh [all|flux|wan]
# Results: $OUT/cache_flux_h200.json, $OUT/cache_wan_h200.json (+ .log); commit them under benchmarks/results/.
# Should a part be cut off by its limit, run it alone in a second call (`flux` or `wan`: 580 s for it).
source benchmarks/gpu_part.sh
show() { grep -E "bench_cache|^\||^flux|^wan|Error|error:|Traceback" | grep -v "step cache " | tail -30; }

if [ "$part" != wan ]; then  # 3 compiles (diffusers over its hooks, ours bf16, ours fp8): ≈ 4-5 min
    timeout "$(limit 330)" python3 benchmarks/bench_cache.py --model flux.1-dev --compile --fp8 \
        --out "$out/cache_flux_h200.json" 2>&1 | tee "$out/cache_flux_h200.log" | show
fi
if [ "$part" != flux ]; then  # 2 compiles; a computed step is ≈ 1 s (CFG batch of 2 at 32,760 tokens)
    timeout "$(limit 240)" python3 benchmarks/bench_cache.py --model wan2.1-t2v-1.3b --compile \
        --out "$out/cache_wan_h200.json" 2>&1 | tee "$out/cache_wan_h200.log" | show
fi
