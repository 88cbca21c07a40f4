#!/usr/bin/env bash
# The video demo model in one GPU sitting (10 minutes on one H200, deadlines included):
#
#   training/video_demo/run_gpu.sh OUT_DIR [MINUTES]      # MINUTES: the whole sitting, default 10
#
# 1. the VAE (recipe "gpu": 128 five-frame clips a step, then for the last 40% of its time 32
#    seventeen-frame clips, each from a bank drawn once on the GPU, each step replayed as a CUDA
#    graph) until its share (45%) of the training time is up, then the recipe's 17-frame clip set
#    encoded once;
# 2. the DiT with its UMT5 text encoder (batch 512, CUDA graph) until the deadline; the EMA weights
#    exported as a diffusers WanPipeline folder named video_model/;
# 3. the folder packed into OUT_DIR as video_model.tar.* parts (< 15 MB each) before anything else,
#    then scored on the 48 held-out prompts x seeds 0 1 (OUT_DIR/eval.json, grid.png).
# Logs: OUT_DIR/train.log, OUT_DIR/eval.log. Unpack into the package with:
#   cat OUT_DIR/video_model.tar.* | tar x -C ditserve/demo        # -> ditserve/demo/video_model/
# Each stage stops by the clock, so something is always exported. VIDEO_DEMO_WORK_DIR (default
# /tmp/ditserve-video-demo) is wiped first unless VIDEO_DEMO_RESUME=1.
#
# VIDEO_DEMO_TRAIN_ARGS are passed to `train` (e.g. "--dit-init FOLDER --dit-lr 5e-4" to continue a DiT).
#
# VIDEO_DEMO_STAGE=sharpen trains nothing new: it copies a finished folder (VIDEO_DEMO_SHARPEN_FROM, default
# the shipped ditserve/demo/video_model), fine-tunes its VAE decoder on the GPU (`sharpen`: the encoder, the
# latent space and the DiT unchanged; batch VIDEO_DEMO_SHARPEN_BATCH, default 64, lr VIDEO_DEMO_SHARPEN_LR,
# default 2e-4; VIDEO_DEMO_SHARPEN_ARGS more `sharpen` flags, e.g. "--widen" for twice the decoder's channels)
# until the deadline, then packs and scores the folder as after training.
#
# Two sittings (the issue allows ~20 minutes; a device call is at most 10): VIDEO_DEMO_STAGE=vae
# trains only the VAE for all of MINUTES and leaves its checkpoints in OUT_DIR/vae/; then, with
# them copied into the checkout (e.g. out/video_demo_vae/, ignored by git), VIDEO_DEMO_STAGE=dit
# VIDEO_DEMO_VAE_FROM=out/video_demo_vae trains the DiT for all of MINUTES, exports and scores.
set -euo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [MINUTES]}
minutes=${2:-10}
work=${VIDEO_DEMO_WORK_DIR:-/tmp/ditserve-video-demo}
device=${VIDEO_DEMO_DEVICE:-cuda}
recipe=${VIDEO_DEMO_RECIPE:-gpu}
eval_reserve=${VIDEO_DEMO_EVAL_MINUTES:-1.2}  # scoring, packing and start-up come out of MINUTES too
start=$(date +%s)
export PYTHONUNBUFFERED=1
[ "${VIDEO_DEMO_RESUME:-0}" = 1 ] || rm -rf "$work"
mkdir -p "$out" "$work"
left() {  # minutes left, less a reserve
    python3 -c "print(round(max(0.5, $minutes - ($(date +%s) - $start) / 60 - $1), 2))"
}

{ nvidia-smi -L || true; python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } >"$out/train.log" 2>&1
stage=${VIDEO_DEMO_STAGE:-all}
[ "$stage" = vae ] && eval_reserve=${VIDEO_DEMO_EVAL_MINUTES:-0.3}  # nothing to score or pack: start-up only
if [ "$stage" = dit ]; then
    cp "${VIDEO_DEMO_VAE_FROM:?VIDEO_DEMO_STAGE=dit needs VIDEO_DEMO_VAE_FROM (the vae/ folder of a vae sitting)}"/vae*.ckpt "$work/"
fi
if [ "$stage" = sharpen ]; then
    rm -rf "$work/video_model" && cp -r "${VIDEO_DEMO_SHARPEN_FROM:-ditserve/demo/video_model}" "$work/video_model"
    chmod -R u+w "$work/video_model"
    python3 -m training.video_demo sharpen --model-path "$work/video_model" --device "$device" --threads 8 \
        --batch-size "${VIDEO_DEMO_SHARPEN_BATCH:-64}" --lr "${VIDEO_DEMO_SHARPEN_LR:-2e-4}" --steps 1000000 \
        --max-minutes "$(left "$eval_reserve")" ${VIDEO_DEMO_SHARPEN_ARGS:-} >>"$out/train.log" 2>&1
else
    python3 -m training.video_demo train --recipe "$recipe" --device "$device" --threads 8 --work-dir "$work" \
        --out "$work/video_model" --max-minutes "$(left "$eval_reserve")" --stage "$stage" \
        ${VIDEO_DEMO_TRAIN_ARGS:-} >>"$out/train.log" 2>&1
fi
if [ "$stage" = vae ]; then
    mkdir -p "$out/vae" && cp "$work"/vae*.ckpt "$out/vae/"
    echo "done in $(( $(date +%s) - start )) s (VAE only)" | tee -a "$out/train.log"
    exit 0
fi
# pack first: scoring is nice to have, the weights are not
(cd "$work" && tar cf - video_model | split -b 14000000 - "$out/video_model.tar.")
echo "packed after $(( $(date +%s) - start )) s" >>"$out/train.log"
timeout "${VIDEO_DEMO_EVAL_TIMEOUT:-100}" python3 -m training.video_demo evaluate --model-path "$work/video_model" \
    --device "$device" --seeds 0 1 --json "$out/eval.json" --grid "$out/grid.png" ${VIDEO_DEMO_EVAL_ARGS:-} \
    >"$out/eval.log" 2>&1 \
    || echo "evaluation failed or timed out (rc $?)" >>"$out/eval.log"
echo "done in $(( $(date +%s) - start )) s" | tee -a "$out/train.log"
