"""Memory in the reports: per-stage peak GPU memory in Timings (absent on the CPU), the pre-run
warning that names the flag that helps, and the weights' size read from safetensors headers."""

from __future__ import annotations

import torch

from ditserve.api.output import Timings
from ditserve.config.memory import MemoryConfig
from ditserve.runtime.fit import GIB, component_bytes, fit_warning

SIZES = {"transformer": 22 * GIB, "text_encoder_2": 9 * GIB, "text_encoder": GIB // 4, "vae": GIB // 6}


def test_peak_memory_is_reported_only_when_measured(tiny_flux_dev):
    assert "peak_memory_gib" not in Timings(stages={"denoise": 1.0}).to_dict()
    got = Timings(stages={"denoise": 1.0}, peak_memory_gib={"denoise": 12.5}).to_dict()
    assert got["peak_memory_gib"] == {"denoise": 12.5}
    from ditserve import Generator

    out = Generator.from_pretrained(tiny_flux_dev, device="cpu").generate(
        "a fox", height=32, width=32, num_inference_steps=1, seed=0, max_sequence_length=16)
    assert out.timings.peak_memory_gib is None  # CPU: nothing measured


def test_warning_names_the_flag_that_helps():
    none, model = MemoryConfig(), MemoryConfig(cpu_offload="model")
    assert fit_warning(SIZES, 80 * GIB, none) is None
    assert "--cpu-offload model" in fit_warning(SIZES, 24 * GIB, none)
    assert "--cpu-offload layerwise" in fit_warning(SIZES, 16 * GIB, none)
    assert fit_warning(SIZES, 24 * GIB, model) is None
    assert "--cpu-offload layerwise" in fit_warning(SIZES, 16 * GIB, model)
    text_heavy = dict(SIZES, transformer=4 * GIB)
    assert "--text-encoder-device cpu" in fit_warning(text_heavy, 8 * GIB, model)
    layer = MemoryConfig(cpu_offload="layerwise", gpu_memory_budget_gib=12)
    assert fit_warning(SIZES, 16 * GIB, layer) is None
    assert "--gpu-memory-budget 7" in fit_warning(SIZES, 8 * GIB, layer)
    assert len(fit_warning(SIZES, 16 * GIB, none).splitlines()) == 1


def test_weights_counted_from_headers(tiny_flux_dev):
    sizes = component_bytes(tiny_flux_dev, 2)
    assert {"transformer", "text_encoder", "text_encoder_2", "vae"} <= set(sizes)
    from safetensors.torch import load_file

    numel = sum(t.numel() for f in (tiny_flux_dev / "transformer").glob("*.safetensors")
                for t in load_file(f).values())
    assert sizes["transformer"] == 2 * numel
    assert torch.finfo(torch.bfloat16).bits // 8 == 2
