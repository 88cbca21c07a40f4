"""The trained demo model through each speed path on the GPU, against the eager bf16 images of the
same seed: a check of the fast paths on a model whose blocks matter (random weights hide block errors).

History (H200, bf16, 8 images): with the first QK kernel, compile + fused drew visibly different
circles (max 255, mean 6-11). With today's kernel: eager+fused 0/255; compile and compile+fused
15/255, mean 0.52 (bf16 rounding through 20 steps).
Usage on the device machine: python3 benchmarks/check_demo_paths.py  (prints one line per path).
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

from ditserve import demo
from ditserve.config import AccelConfig, EngineConfig, ModelConfig
from ditserve.runtime.engine import Engine
from ditserve.runtime.generator import Generator

PROMPTS = ["a red circle on the left, blue background", "a green square at the top, white background"]
PATHS = {
    "eager": AccelConfig(),
    "eager+fused": AccelConfig(fused_kernels=True),
    "compile": AccelConfig(compile=True),
    "compile+fused": AccelConfig(compile=True, fused_kernels=True),
}


def images(accel: AccelConfig, device: str) -> np.ndarray:
    gen = Generator(Engine.from_config(EngineConfig(ModelConfig(str(demo.model_path()), device, "bfloat16"),
                                                    accel=accel)))
    out = [gen.generate(p, num_images=4, seed=7).images for p in PROMPTS]
    return np.stack([np.asarray(img) for batch in out for img in batch]).astype(np.int32)


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    paths = PATHS if device == "cuda" else {"eager": PATHS["eager"]}
    ref = images(PATHS["eager"], device)
    report = {}
    for name, accel in paths.items():
        diff = np.abs(images(accel, device) - ref)
        report[name] = {"max": int(diff.max()), "mean": round(float(diff.mean()), 3)}
        print(f"{name:14s} vs eager: max {report[name]['max']:3d}/255  mean {report[name]['mean']}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
