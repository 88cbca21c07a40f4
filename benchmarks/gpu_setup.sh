#!/usr/bin/env bash
# On the GPU machine: install the pure-Python wheels carried in .whl/ and put the checkout on PYTHONPATH.
# The install is skipped when /tmp/site already holds this set of wheels (a warm machine, or the second
# job of benchmarks/gpu_pair.sh, which installs once before starting both).
# Usage: source benchmarks/gpu_setup.sh
wheels="$(ls .whl/*.whl 2>/dev/null)"
if [ "$(cat /tmp/site/.ditserve_wheels 2>/dev/null)" != "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "$wheels" > /tmp/site/.ditserve_wheels
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
