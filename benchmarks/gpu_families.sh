#!/usr/bin/env bash
# The DiT-step benchmarks of the SD3.5 (issue 18), CogVideoX (20) and HunyuanVideo (19) families, on one
# GPU, in device calls under 10 minutes: ditserve eager / compiled / compiled fp8 against diffusers eager
# and compiled (compile_repeated_blocks) on the same random weights, with the quality guards.
# Usage (device `run`, carry [".whl"]): DITSERVE_COMMIT=<hash> bash benchmarks/gpu_families.sh PART
# One PART per device call: each compiled variant (ours, diffusers', ours fp8) spends 40-60 s compiling
# before it is timed, so no two parts fit one 600 s call (session 6 ran sd3, cogvideox and hunyuan544 in
# one call with 120-280 s limits per bench: only SD3.5-Large finished).
#   PART: sd3 (Large and Medium, ≈ 2 × 2.5 min), cogvideox (5B 720x480x49, ≈ 4-5 min),
#         hunyuan544 (544x960x129, 67k tokens, ≈ 7 min incl. fp8 attention), hunyuan720 (720x1280x129, 119k
#         tokens, one timed call of each variant: a step is ≈ 20 s, ≈ 8 min; the calls are counted in
#         hunyuan_video.bench_step; fp8 linears run only together with the fp8 attention backend, to fit),
#         qwen (Qwen-Image 1328², 20B: bf16, fp8 and fp8 + fp8 attention, ≈ 6-8 min; issue 21's Qwen goal),
#         ti2v (Wan2.2-TI2V-5B 704x1280x121, 27,280 tokens, per-token timesteps; the same variants, ≈ 5-7 min)
# cogvideox, hunyuan544 and hunyuan720 add a compiled variant with fp8 linears + the fp8 attention backend
# (`fp8_attn_*` fields; ≈ 1 min more each; hunyuan720 runs it instead of fp8 linears alone): at 17.8k-119k
# tokens the cuDNN fp8 kernel is where the step can gain.
# Results: $OUT/<family>_step_h200.json (+ .log); commit them under benchmarks/results/.
source benchmarks/gpu_part.sh
show() { grep -E "speedup|_step_s|guard_ok|Error|error:|Traceback" | tail -40; }
bench() {  # seconds, json name, then `ditserve bench` arguments
    local limit=$1 name=$2; shift 2
    timeout "$limit" python3 -m ditserve.cli.main bench "$@" --json "$out/$name.json" \
        >"$out/$name.log" 2>&1; echo "== $name rc=$?"; show <"$out/$name.log"
}
hunyuan() {  # seconds, json name, height, width, timed calls, attention backend of the extra variant (auto: none),
    # fp8 linears alone as a variant too (1) or only with that attention backend (0)
    timeout "$1" python3 - "$out/$2.json" "$3" "$4" "$5" "$6" "$7" >"$out/$2.log" 2>&1 <<'EOF'
import json, logging, sys
from pathlib import Path
from ditserve.bench.hunyuan_video import bench_step
logging.basicConfig(level=logging.INFO)
path, h, w, reps, attention = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
row = bench_step(height=h, width=w, num_frames=129, quantization="fp8", reps=reps, attention=attention,
                 fp8_alone=sys.argv[6] == "1")
path.write_text(json.dumps([row], indent=2))
print(json.dumps(row, indent=2))
EOF
    echo "== $2 rc=$?"; show <"$out/$2.log"
}
nvidia-smi --query-gpu=name,clocks.sm,power.draw --format=csv,noheader
for part in "$@"; do
    case "$part" in
        sd3) bench 270 sd35_large_step_h200 --model sd3.5-large --quantization fp8  # ≈ 3 min
             bench 300 sd35_medium_step_h200 --model sd3.5-medium --quantization fp8 ;;  # ≈ 3.2 min alone
        cogvideox) bench 560 cogvideox_5b_step_h200 --model cogvideox-5b --quantization fp8 --attention-backend fp8 ;;
        hunyuan544) hunyuan 560 hunyuanvideo_544p_step_h200 544 960 2 fp8 1 ;;
        hunyuan720) hunyuan 570 hunyuanvideo_720p_step_h200 720 1280 1 fp8 0 ;;
        qwen) bench 580 qwen_image_step_h200 --model qwen-image --quantization fp8 --attention-backend fp8 ;;
        ti2v) bench 560 wan22_ti2v_5b_step_h200 --model wan2.2-ti2v-5b --quantization fp8 --attention-backend fp8 ;;
        *) echo "unknown part $part"; exit 2 ;;
    esac
done
