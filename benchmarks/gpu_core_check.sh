#!/usr/bin/env bash
# One device call for the denoising core (issue 12): segment CUDA graphs and fp8 quantiser on the GPU,
# then the FLUX.1-dev step bench (bf16 and fp8 vs diffusers eager/compiled, one run).
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_core_check.sh
set -u
source benchmarks/gpu_setup.sh
export DITSERVE_COMMIT="${DITSERVE_COMMIT:?set DITSERVE_COMMIT to the commit under test}"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_cuda.py -k "segment or quantisation" 2>&1 | tail -3
timeout 420 python3 -c 'from ditserve.cli.main import main; import sys; sys.exit(main())' bench --model flux.1-dev \
    --quantization fp8 --json "${OUT:-.}/flux_step_h200.json" 2>&1 \
    | grep -E '"(ditserve_step_s|ditserve_fp8_step_s|diffusers_compiled_step_s|speedup_vs_diffusers_compiled|fp8_speedup_vs_diffusers_compiled|guard_ok)"'
