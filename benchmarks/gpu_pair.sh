#!/usr/bin/env bash
# Two one-GPU device jobs at once on a 2-GPU machine (device kind nvidia-h200-x2): the first command on
# GPU 0, the second on GPU 1 (CUDA_VISIBLE_DEVICES; an executor's ranks count from the visible GPU too).
# The machine's time counts once for both. Don't pair two jobs that stream weights from host memory
# (bench_offload, bench_load): they would share the host's copy bandwidth.
# Usage (device `run`, kind nvidia-h200-x2, carry [".whl"]):
#   DITSERVE_COMMIT=<hash> bash benchmarks/gpu_pair.sh 'bash benchmarks/gpu_families.sh ti2v' 'bash benchmarks/gpu_cache.sh flux'
# Each job's output: $OUT/pair_gpu{0,1}.log (results: what each job writes under $OUT).
set -u
export DITSERVE_COMMIT="${DITSERVE_COMMIT:?set DITSERVE_COMMIT to the commit under test}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the machine's rule
out="${OUT:-benchmarks/results}"
[ $# -eq 2 ] || { echo "usage: gpu_pair.sh 'command for GPU 0' 'command for GPU 1'"; exit 2; }
source benchmarks/gpu_setup.sh  # once, before both jobs (theirs then find the wheels in place)
(CUDA_VISIBLE_DEVICES=0 bash -c "$1" > "$out/pair_gpu0.log" 2>&1; echo "GPU 0 job exit $?") &
(CUDA_VISIBLE_DEVICES=1 bash -c "$2" > "$out/pair_gpu1.log" 2>&1; echo "GPU 1 job exit $?") &
wait
for g in 0 1; do echo "== GPU $g: tail"; tail -15 "$out/pair_gpu$g.log"; done
