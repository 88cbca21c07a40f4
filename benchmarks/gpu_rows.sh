#!/usr/bin/env bash
# Row fusion (AccelConfig.row_fusion) and fp8 fast accumulation (AccelConfig.fp8_fast_accum), issues 18 and
# 21, on one GPU: their GPU tests, then where the step's time goes with and without them
# (benchmarks/diagnose_step.py), in device calls under 10 minutes.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_rows.sh PART
#   PART: sd3 (the fast-accumulation test; SD3.5-Large fp8, +rows, +fastacc, +rows+fastacc, bf16, bf16+rows;
#         ≈ 7 min), flux_wan (FLUX.1-dev fp8, fp8+rows+fastacc; Wan2.1-1.3B fp8+attn8, +rows+fastacc; then
#         the compiled-block GPU tests with what time is left; ≈ 8 min)
# Results: $OUT/diagnose_<model>.json, kernels_*.txt and logs; commit them under benchmarks/results/ as
# <model>_rows_diagnose_h200.json. What wins (step time, and rel_l2_vs_first well inside 3e-2) goes on by
# default; then gpu_families.sh sd3 and FLUX's fp8 row side by side with diffusers.
source benchmarks/gpu_part.sh
diagnose() {  # seconds, model, variants
    timeout "$1" python3 benchmarks/diagnose_step.py --model "$2" --variants "$3" --reps 10 --clocks 0 --out "$out" \
        >"$out/diagnose_$2.log" 2>&1
    echo "== $2 rc=$?"; grep -E "^[a-z0-9+]+ +step|Error|error:|Traceback" "$out/diagnose_$2.log" | tail -12
}
case "$part" in
    sd3) timeout 60 python3 -m pytest -q tests/gpu/test_kernels_cuda.py -k fast_accum -s 2>&1 | grep -E "rel L2|passed|failed"
         diagnose 500 sd3.5-large fp8,fp8+rows,fp8+fastacc,fp8+rows+fastacc,bf16,bf16+rows ;;
    flux_wan) diagnose 200 flux.1-dev fp8,fp8+rows+fastacc
              diagnose 220 wan2.1-t2v-1.3b fp8+attn8,fp8+attn8+rows+fastacc
              timeout 150 python3 -m pytest -q tests/gpu/test_kernels_cuda.py -k "compiled_blocks and True-True-True" -s 2>&1 | grep -E "rel L2|passed|failed" ;;
    *) echo "unknown part $part"; exit 2 ;;
esac
