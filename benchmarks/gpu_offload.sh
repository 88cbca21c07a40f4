#!/usr/bin/env bash
# One device call (under 10 minutes) for issue 17's offload numbers: one DiT step and its peak memory,
# resident, layerwise (every block streamed) and layerwise at a 12 GiB budget, beside diffusers'
# enable_group_offload (block level, CUDA streams) on the same random bf16 weights at real size:
# FLUX.1-dev 1024², Wan2.1-T2V-1.3B 480p x 81, Wan2.1-T2V-14B 720p x 81. Each part writes its JSON as
# it goes (a part cut off by its time limit keeps what it finished) and its log beside it.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_offload.sh [all|flux|wan|wan14b|wan14b_e2e|load|load_wan14b|compiled]
# (wan14b_e2e: Wan-14B end to end, resident and layerwise at 12 GiB, in a call of its own; load: the DiT
# loader on a random FLUX.1-dev-size folder beside the previous reader and diffusers', in a call of its own;
# load_wan14b: the same on a random Wan2.1-T2V-14B folder, 26.6 GiB in 6 shards, in a call of its own;
# compiled: Wan2.1-1.3B and FLUX.1-dev with both sides compiled (`--compile`), in a call of its own)
# Results: $OUT/offload_{flux,wan,wan14b}_h200.json (+ .log); commit them under benchmarks/results/.
source benchmarks/gpu_part.sh
show() { grep -E "bench_offload|^offload|^none|^layerwise|on NVIDIA|^end to end|activation peak|safetensors instead|Error|error:|Traceback" | tail -20; }

if [ "$part" = all ] || [ "$part" = flux ]; then  # 22 GiB of weights, a resident step ≈ 0.17 s
    timeout "$(limit 150)" python3 benchmarks/bench_offload.py --model flux.1-dev --budget 12 \
        --out "$out/offload_flux_h200.json" 2>&1 | tee "$out/offload_flux_h200.log" | show
fi
if [ "$part" = all ] || [ "$part" = wan ]; then  # 1.3B: fits anywhere; streaming should cost nothing
    timeout "$(limit 120)" python3 benchmarks/bench_offload.py --model wan2.1-t2v-1.3b --budget 12 \
        --out "$out/offload_wan_h200.json" 2>&1 | tee "$out/offload_wan_h200.log" | show
fi
if [ "$part" = all ] || [ "$part" = wan14b ]; then  # 27 GiB, a step ≈ 12 s: 3 calls per mode
    timeout "$(limit 300)" python3 benchmarks/bench_offload.py --model wan2.1-t2v-14b --budget 12 \
        --out "$out/offload_wan14b_h200.json" 2>&1 | tee "$out/offload_wan14b_h200.log" | show
fi
if [ "$part" = wan14b_e2e ]; then  # its own call: UMT5 + 2 CFG steps at 75,600 tokens + 720p decode, twice per mode
    # layerwise: per-token parts in 4096-token chunks; the 12 GiB budget is planned at the first DiT call around
    # its estimated activations (CFG batch of 2: about 8.8 GiB chunked, 14.6 GiB whole); e2e_peak_mem_gib < 12
    timeout 580 python3 benchmarks/bench_offload.py --model wan2.1-t2v-14b --budget 12 --only-end-to-end \
        --forward-chunk-size 4096 \
        --out "$out/offload_wan14b_e2e_h200.json" 2>&1 | tee "$out/offload_wan14b_e2e_h200.log" | show
fi
if [ "$part" = load ]; then  # writes a 22 GiB random folder (~1-2 min), then loads it in fresh processes
    timeout 580 python3 benchmarks/bench_load.py --device cuda --double 19 --single 38 --reps 2 --compare \
        --folder /tmp/bench_load_flux --out "$out/load_flux_h200.json" 2>&1 | tee "$out/load_flux_h200.log" | \
        grep -E "^load|^  (safetensors|diffusers)|Error|error:|Traceback" | tail -20
fi
if [ "$part" = load_wan14b ]; then  # writes a 26.6 GiB folder (a shard at a time), then loads it in fresh processes
    rm -rf /tmp/bench_load_flux  # the disk is 64 GiB
    timeout 580 python3 benchmarks/bench_load.py --model wan2.1-t2v-14b --device cuda --reps 2 --compare \
        --folder /tmp/bench_load_wan14b --out "$out/load_wan14b_h200.json" 2>&1 | tee "$out/load_wan14b_h200.log" | \
        grep -E "^load|^  (safetensors|diffusers)|Error|error:|Traceback" | tail -20
fi
if [ "$part" = compiled ]; then  # ours per-block compiled under streaming vs diffusers compile + group offload
    timeout 280 python3 benchmarks/bench_offload.py --model wan2.1-t2v-1.3b --budget 12 --compile \
        --out "$out/offload_wan_compiled_h200.json" 2>&1 | tee "$out/offload_wan_compiled_h200.log" | show
    timeout 280 python3 benchmarks/bench_offload.py --model flux.1-dev --budget 12 --compile \
        --out "$out/offload_flux_compiled_h200.json" 2>&1 | tee "$out/offload_flux_compiled_h200.log" | show
fi
