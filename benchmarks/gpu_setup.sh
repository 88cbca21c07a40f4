#!/usr/bin/env bash
# On the GPU machine: install the pure-Python wheels carried in .whl/ and put the checkout on PYTHONPATH.
# Usage: source benchmarks/gpu_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
