"""HunyuanVideo in the parallel modes at world size 2 (gloo, CPU): CFG-parallel, Ulysses, Ring and TP
give the single-process frames within 1/255. 3x3 tokens per latent frame x 3 frames = 27 video
tokens plus the prompt's text tokens (odd counts: padding and its mask over the ranks), true CFG with
a negative prompt of another length (cond and uncond in separate calls of different lengths).
Slow (two spawned processes, ~35 s): run with -m slow."""

import numpy as np
import pytest

from parallel.harness import run_cases

pytestmark = pytest.mark.slow

HUNYUAN = dict(prompt="a red cat walks on the grass", negative_prompt="blurry, static", seed=0, height=48, width=48,
               num_frames=9, num_inference_steps=2, guidance_scale=6.0, true_cfg_scale=4.0)
MODES = {"cfg": dict(cfg_parallel=True), "ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2),
         "tp": dict(tp_size=2)}


@pytest.fixture(scope="module")
def world2(tiny_hunyuan_video, tmp_path_factory):
    cases = [(f"hunyuan-{mode}", tiny_hunyuan_video, kw, HUNYUAN, {}) for mode, kw in MODES.items()]
    return run_cases(cases, 2, tmp_path_factory.mktemp("hunyuan_world2"))


@pytest.mark.parametrize("mode", list(MODES))
def test_world_2_matches_single_process(world2, tiny_hunyuan_video, reference, mode):
    expected = reference(tiny_hunyuan_video, HUNYUAN)
    got = world2[f"hunyuan-{mode}"]
    assert got.shape == expected.shape and expected.std() > 10
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
