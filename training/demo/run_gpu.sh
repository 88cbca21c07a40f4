#!/usr/bin/env bash
# How the shipped demo weights were trained: one GPU, one sitting of about 8.5 minutes.
#
#   training/demo/run_gpu.sh OUT_DIR [MINUTES]
#
# 1. the VAE (recipe "gpu"), then the 200k training scenes encoded once;
# 2. two DiT runs side by side on that VAE and data: "gpu" and its lower-learning-rate hedge
#    "gpu-lowlr", each stopping (checkpointed) at the deadline;
# 3. each exported pipeline is packed into OUT_DIR as <recipe>.tar.* parts (15 MB each) and
#    scored on the held-out prompts; the logs go there too.
# Unpack with: cat OUT_DIR/gpu.tar.* | tar x   (-> model/)
set -euo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [MINUTES]}
minutes=${2:-8.5}
work=${DEMO_WORK_DIR:-/tmp/ditserve-demo}
device=${DEMO_DEVICE:-cuda}
read -r -a recipes <<<"${DEMO_RECIPES:-gpu gpu-lowlr}"  # the first one's VAE recipe is used
start=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$work"
left() {  # minutes left, less a reserve for scoring and packing
    python3 -c "print(max(0.5, $minutes - ($(date +%s) - $start) / 60 - $1))"
}

nvidia-smi -L >"$out/vae.log" 2>&1 || true
python3 -m training.demo train --recipe "${recipes[0]}" --device "$device" --threads 4 --work-dir "$work/vae" \
    --dit-steps 0 --out "$work/vae/untrained" --max-minutes "$(left 1.5)" >>"$out/vae.log" 2>&1
vae_steps=$(python3 -c "import torch; print(torch.load('$work/vae/vae.ckpt')['step'])")

dit_minutes=$(left 1.2)
for r in "${recipes[@]}"; do
    rm -rf "${work:?}/$r" && cp -r "$work/vae" "$work/$r" && rm -f "$work/$r/dit.ckpt"
    python3 -m training.demo train --recipe "$r" --device "$device" --threads 4 --work-dir "$work/$r" \
        --vae-steps "$vae_steps" --out "$work/$r/model" --max-minutes "$dit_minutes" >"$out/$r.log" 2>&1 &
done
wait

for r in "${recipes[@]}"; do  # pack first: scoring is nice to have, the weights are not
    (cd "$work/$r" && tar cf - model | split -b 15000000 - "$out/$r.tar.") || echo "no model from $r" >>"$out/vae.log"
done
for r in "${recipes[@]}"; do
    timeout 60 python3 -m training.demo evaluate --model-path "$work/$r/model" --threads 4 --seeds 0 1 \
        >>"$out/$r.log" 2>&1 &
done
wait
echo "done in $(( $(date +%s) - start )) s" >>"$out/vae.log"
