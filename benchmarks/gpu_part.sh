# Sourced by the benchmarks/gpu_*.sh scripts (after their usage notes): the carried wheels on the path,
# the commit under test, where results go ($out: $OUT on the device), which part runs ($part: the
# script's first argument, default all) and `limit SECONDS`: a part's time limit, the given share when
# every part runs in one call, 580 s when one part runs alone.
set -u
source benchmarks/gpu_setup.sh
export DITSERVE_COMMIT="${DITSERVE_COMMIT:?set DITSERVE_COMMIT to the commit under test}"
out="${OUT:-benchmarks/results}"
part="${1:-all}"
limit() { if [ "$part" = all ]; then echo "$1"; else echo 580; fi; }
