#!/usr/bin/env bash
# Row fusion (AccelConfig.row_fusion; issues 18 and 21) on one GPU: its GPU tests, then where the step's
# time goes with and without it (benchmarks/diagnose_step.py), in device calls under 10 minutes.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_rows.sh PART
#   PART: sd3 (the tests/gpu cases, then SD3.5-Large fp8, fp8+rows, bf16, bf16+rows; ≈ 6 min),
#         flux_wan (FLUX.1-dev fp8, fp8+rows; Wan2.1-1.3B fp8+attn8, fp8+attn8+rows; ≈ 6 min)
# Results: $OUT/diagnose_<model>.json, kernels_*.txt and logs; commit them under benchmarks/results/ as
# <model>_rows_diagnose_h200.json. If row fusion wins, turn it on by default and run gpu_families.sh sd3.
source benchmarks/gpu_part.sh
diagnose() {  # seconds, model, variants
    timeout "$1" python3 benchmarks/diagnose_step.py --model "$2" --variants "$3" --reps 10 --clocks 0 --out "$out" \
        >"$out/diagnose_$2.log" 2>&1
    echo "== $2 rc=$?"; grep -E "^[a-z0-9+]+ +step|Error|error:|Traceback" "$out/diagnose_$2.log" | tail -12
}
case "$part" in
    sd3) timeout 120 python3 -m pytest -q tests/gpu/test_kernels_cuda.py -k "compiled_blocks" 2>&1 | tail -4
         diagnose 440 sd3.5-large fp8,fp8+rows,bf16,bf16+rows ;;
    flux_wan) diagnose 280 flux.1-dev fp8,fp8+rows
              diagnose 280 wan2.1-t2v-1.3b fp8+attn8,fp8+attn8+rows ;;
    *) echo "unknown part $part"; exit 2 ;;
esac
