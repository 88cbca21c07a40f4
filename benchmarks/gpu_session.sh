#!/usr/bin/env bash
# One device call (under 10 minutes): the kernel checks, the kernel tiles, the FLUX step bench and
# the demo-model path check, each with its own time limit; results land in $OUT.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_session.sh
set -u
source benchmarks/gpu_setup.sh
export DITSERVE_COMMIT="${DITSERVE_COMMIT:?set DITSERVE_COMMIT to the commit under test}"
out="${OUT:-.}"
bench() { python3 -c 'from ditserve.cli.main import main; import sys; sys.exit(main())' bench "$@"; }

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_cuda.py \
    -k "matches_reference or quantisation" 2>&1 | grep -E "passed|failed|Error" | tail -5
timeout 90 python3 benchmarks/qk_kernel_variants.py "$out/qk_kernel_variants_h200.json" 2>&1 | grep -E "ms  rel"
timeout 240 bench --model flux.1-dev --quantization fp8 --json "$out/flux_step_h200.json" 2>&1 \
    | grep -E '"(ditserve_step_s|ditserve_fp8_step_s|diffusers_compiled_step_s|speedup|fp8_speedup|guard_ok)'
timeout 100 python3 benchmarks/check_demo_paths.py 2>&1 | grep "vs eager"
