"""The Wan end-to-end bench (GPU) runs on the CPU at toy size in float32: diffusers' WanPipeline and
ditserve's Generator on the same saved random weights give the same frames (DESIGN.md: within 1/255),
the row has its fields, and the agreement it reports drops when ditserve's guidance is wrong."""

import logging
import math

import pytest
import torch

from ditserve.bench import wan_e2e

ROW_KEYS = {"model", "gpu", "shape", "commit", "steps", "default_steps", "guidance_scale", "cfg", "weights_gib",
            "diffusers_eager_e2e_s", "diffusers_eager_mean_step_s", "diffusers_eager_peak_memory_gib",
            "ditserve_e2e_s", "ditserve_stages_s", "ditserve_mean_step_s", "ditserve_peak_memory_gib",
            "ditserve_load_s", "psnr_ditserve_vs_diffusers_db", "max_abs_diff_vs_diffusers", "frames_std",
            "speedup_vs_diffusers_eager", "est_e2e_s_at_default_steps",
            "ditserve_fp8_e2e_s", "ditserve_fp8_stages_s", "fp8_psnr_vs_bf16_db", "fp8_psnr_vs_diffusers_db",
            "ditserve_attn_e2e_s", "ditserve_attn_stages_s", "attn_psnr_vs_bf16_db", "attn_psnr_vs_diffusers_db"}


@pytest.fixture(autouse=True)
def one_thread():
    """The toy models are too small to share out: on a busy 2-core machine two OpenMP threads wait on
    each other and a run takes ≈ 30 s instead of ≈ 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(**kw) -> dict:
    return wan_e2e.bench_end_to_end(tiny=True, device="cpu", compile=False, steps=3, **kw)


def test_tiny_frames_match_diffusers(caplog):
    # on the CPU the fp8 engine runs unquantised and the fp8 attention backend leaves SDPA: the fields, and
    # that the backend reached the engine (it says it falls back)
    with caplog.at_level(logging.INFO, logger="ditserve.accel.attention"):
        row = _run(quantization="fp8", attention="fp8")
    assert any("attention backend fp8 needs a CUDA GPU" in r.getMessage() for r in caplog.records)
    assert ROW_KEYS <= set(row) and row["gpu"] == "cpu" and row["dtype"] == "float32"
    assert row["shape"].startswith("32x32x5, 3 steps") and row["steps"] == 3 and row["default_steps"] == 50
    assert row["frames_finite"] and row["frames_std"] > 10  # not a flat video: the agreement means something
    assert row["max_abs_diff_vs_diffusers"] <= 1 and row["psnr_ditserve_vs_diffusers_db"] >= 45
    assert {"encode_prompt", "denoise", "decode"} <= set(row["ditserve_stages_s"])
    assert row["diffusers_eager_e2e_s"] > 0 and row["ditserve_e2e_s"] > 0 and row["ditserve_mean_step_s"] > 0
    assert row["diffusers_eager_mean_step_s"] > 0
    assert row["est_e2e_s_at_default_steps"]["ditserve"] > row["ditserve_e2e_s"]
    assert row["attention_backend"] == "fp8" and row["attn_psnr_vs_bf16_db"] >= 45
    assert "diffusers_compiled_e2e_s" not in row  # compile=False


def test_agreement_drops_with_wrong_guidance(monkeypatch):
    from ditserve.sampling import guidance

    monkeypatch.setattr(guidance, "cfg_combine", lambda cond, uncond, scale: cond)  # CFG dropped in ditserve
    row = _run()
    assert row["max_abs_diff_vs_diffusers"] > 10 and row["psnr_ditserve_vs_diffusers_db"] < 40
    assert math.isfinite(row["psnr_ditserve_vs_diffusers_db"])


@pytest.mark.slow  # ≈ 40 s on 2 CPU cores: inductor compiles both sides' blocks
def test_tiny_compiled_frames_match_diffusers(monkeypatch):
    for flag in ("coordinate_descent_tuning", "epilogue_fusion"):  # apply_compile sets these: undone after
        monkeypatch.setattr(torch._inductor.config, flag, getattr(torch._inductor.config, flag))
    try:
        row = wan_e2e.bench_end_to_end(tiny=True, device="cpu", compile=True, steps=3)
    finally:
        torch._dynamo.reset()
    assert row["compile"] and row["diffusers_compiled_e2e_s"] > 0 and row["speedup_vs_diffusers_compiled"] > 0
    assert row["ditserve_load_s"]["warmup"] > 0  # the engine warmed up (compiled) at the bench's shape
    assert row["psnr_diffusers_compiled_vs_eager_db"] >= 45
    assert row["max_abs_diff_vs_diffusers"] <= 1
