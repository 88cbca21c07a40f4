#!/usr/bin/env bash
# One device call (under 10 minutes) for issue 21's first GPU numbers on the fp8 attention backend:
# its GPU tests (native casts vs the torch emulation, cuDNN vs emulation, compile + CUDA graph), the
# kernel bench at FLUX / Qwen-Image / Wan shapes (bf16 SDPA vs fp8, parts, rel L2), then the
# Wan2.1-1.3B 480p x 81 DiT step (compiled; fp8 linears, and fp8 linears + fp8 attention) beside
# diffusers eager and compiled. Each part writes its JSON and log as it goes.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_attention8.sh [all|kernel|wan]
# Results: $OUT/attention8_h200.json, $OUT/wan_step_attention8_h200.json (+ .log); commit them under
# benchmarks/results/.
source benchmarks/gpu_part.sh

if [ "$part" != wan ]; then  # ≈ 3-4 min
    timeout "$(limit 240)" bash -c "python3 -m pytest -q tests/gpu/test_attention8_cuda.py; \
        python3 benchmarks/bench_attention8.py $out/attention8_h200.json" 2>&1 | tee "$out/attention8_h200.log" | tail -25
fi
if [ "$part" != kernel ]; then  # 4 compiles at 32,760 tokens; a step is ≈ 0.5 s
    timeout "$(limit 330)" python3 -m ditserve.cli.main bench --model wan2.1-t2v-1.3b --quantization fp8 \
        --attention-backend fp8 --compare diffusers --reps 5 --json "$out/wan_step_attention8_h200.json" 2>&1 \
        | tee "$out/wan_step_attention8_h200.log" \
        | grep -E '"(ditserve_step_s|ditserve_fp8_step_s|ditserve_fp8_attn_step_s|diffusers_compiled_step_s|speedup_vs_diffusers_compiled|fp8_speedup|fp8_attn_speedup|fp8_rel_l2|fp8_attn_rel_l2|guard_ok|fp8_guard_ok|fp8_attn_guard_ok)|Error|Traceback' | tail -30
fi
