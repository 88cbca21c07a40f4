"""Every parallel mode, and the combinations CFG x Ulysses, Ulysses x Ring (USP) and TP x Ulysses,
give the single-process pixels within 1/255 on the tiny FLUX, Qwen-Image and Wan checkpoints, with
real gloo groups of 2 and 4 CPU processes.

The requests are chosen so that every mechanism is exercised: token counts that do not divide by
the ranks (15 image tokens, 31 text tokens, 45 video tokens: padding and its masks), true CFG with a
negative prompt (the CFG branches; for Qwen-Image prompts of different lengths: a key mask), and
`test_a_broken_padding_mask_is_caught` shows the comparison can fail.
"""

import numpy as np
import pytest

from parallel.harness import held_parameters, run_cases

FLUX = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=7, height=48, width=80,
            num_inference_steps=3, guidance_scale=3.5, true_cfg_scale=4.0, max_sequence_length=31)
# 3 image and 7 text tokens: over 2 ranks a quarter of the image keys are padding
FLUX_SHORT = dict(FLUX, height=16, width=48, max_sequence_length=7)
QWEN = dict(prompt="a red fox in the snow", negative_prompt="blurry, low quality", seed=3, height=48, width=80,
            num_inference_steps=3, true_cfg_scale=4.0)
WAN = dict(prompt="a red fox running", negative_prompt="static", seed=0, height=48, width=80, num_frames=9,
           num_inference_steps=3, guidance_scale=4.0, fps=16)

MODES_2 = {"cfg": dict(cfg_parallel=True), "ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2),
           "tp": dict(tp_size=2)}
# (model, mode name, degrees) at world size 4
CASES_4 = [
    ("flux", "cfg-ulysses", dict(cfg_parallel=True, ulysses_degree=2)),
    ("flux", "usp", dict(ulysses_degree=2, ring_degree=2)),
    ("flux", "ring4", dict(ring_degree=4)),
    ("flux4h", "tp-ulysses", dict(tp_size=2, ulysses_degree=2)),
    ("flux4h", "ulysses4", dict(ulysses_degree=4)),
    ("qwen", "cfg-ulysses", dict(cfg_parallel=True, ulysses_degree=2)),
    ("wan", "usp", dict(ulysses_degree=2, ring_degree=2)),
]
# the same combinations on the other model (each already covered on FLUX at world 4 and per model at
# world 2): `-m slow`, on a group of their own
CASES_4_SLOW = [
    ("qwen", "usp", dict(ulysses_degree=2, ring_degree=2)),
    ("wan", "cfg-ulysses", dict(cfg_parallel=True, ulysses_degree=2)),
]
REQUESTS = {"flux": FLUX, "flux4h": FLUX, "qwen": QWEN, "wan": WAN}


@pytest.fixture(scope="module")
def folders(tiny_flux_dev, tiny_flux_4heads, tiny_qwen_image, tiny_wan):
    return {"flux": tiny_flux_dev, "flux4h": tiny_flux_4heads, "qwen": tiny_qwen_image, "wan": tiny_wan("t2v")}


@pytest.fixture(scope="module")
def world2(folders, tmp_path_factory):
    cases = [(f"{m}-{mode}", folders[m], kw, REQUESTS[m], {}) for m in ("flux", "qwen", "wan")
             for mode, kw in MODES_2.items()]
    # the pipeline's decode through the parallel VAE decode (frames this small are one tile: the whole decode)
    cases.append(("wan-ulysses-vae", folders["wan"], dict(ulysses_degree=2, vae_parallel=True), WAN, {}))
    cases.append(("flux-ulysses-broken", folders["flux"], MODES_2["ulysses"], FLUX_SHORT, {"break": "pad_mask"}))
    work = tmp_path_factory.mktemp("world2")
    return run_cases(cases, 2, work), work


def _world4(folders, tmp_path_factory, table, name):
    cases = [(f"{m}-{mode}", folders[m], kw, REQUESTS[m], {}) for m, mode, kw in table]
    work = tmp_path_factory.mktemp(name)
    return run_cases(cases, 4, work), work


@pytest.fixture(scope="module")
def world4(folders, tmp_path_factory):
    return _world4(folders, tmp_path_factory, CASES_4, "world4")


@pytest.fixture(scope="module")
def world4_slow(folders, tmp_path_factory):
    return _world4(folders, tmp_path_factory, CASES_4_SLOW, "world4_slow")


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert expected.std() > 10  # a real picture, not a flat one
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("model", ["flux", "qwen", "wan"])
@pytest.mark.parametrize("mode", list(MODES_2))
def test_world_2_matches_single_process(world2, folders, reference, model, mode):
    results, _ = world2
    assert_close(results[f"{model}-{mode}"], reference(folders[model], REQUESTS[model]))


@pytest.mark.parametrize("model,mode", [(m, mode) for m, mode, _ in CASES_4])
def test_world_4_matches_single_process(world4, folders, reference, model, mode):
    results, _ = world4
    assert_close(results[f"{model}-{mode}"], reference(folders[model], REQUESTS[model]))


@pytest.mark.slow
@pytest.mark.parametrize("model,mode", [(m, mode) for m, mode, _ in CASES_4_SLOW])
def test_world_4_matches_single_process_on_more_models(world4_slow, folders, reference, model, mode):
    results, _ = world4_slow
    assert_close(results[f"{model}-{mode}"], reference(folders[model], REQUESTS[model]))


def test_parallel_vae_decode_in_the_pipeline(world2, folders, reference):
    assert_close(world2[0]["wan-ulysses-vae"], reference(folders["wan"], WAN))


@pytest.mark.parametrize("model", ["flux", "qwen", "wan"])
def test_tensor_parallel_ranks_hold_a_shard_of_the_weights(world2, folders, model):
    """Each TP rank holds the same, smaller part of the DiT; together more than one copy of the
    replicated parts (embedders, modulation, head) but well under two whole models."""
    _, work = world2
    from ditserve.config import EngineConfig, ModelConfig
    from ditserve.runtime.engine import Engine

    whole = Engine.from_config(EngineConfig(ModelConfig(str(folders[model]), "cpu", "float32"))).pipeline.dit
    full = sum(p.numel() for p in whole.parameters())
    held = held_parameters(work, f"{model}-tp", 2)
    assert held[0] == held[1] < full
    assert full < sum(held) < 2 * full
    assert held_parameters(work, f"{model}-ulysses", 2) == [full, full]


def test_a_broken_padding_mask_is_caught(world2, folders, reference):
    """With padded keys left unmasked, the image moves by far more than the tolerance: the
    comparisons above can fail."""
    results, _ = world2
    expected = reference(folders["flux"], FLUX_SHORT)
    assert np.abs(results["flux-ulysses-broken"].astype(int) - expected.astype(int)).max() > 10
