"""The parallel loader on a real GPU (skipped without CUDA): checkpoint tensors through each thread's
pinned staging buffer and side stream, converted on the GPU, equal safetensors' own values, with no
fallback to the slow path. Run on the device machine: python3 -m pytest -q tests/gpu/test_load_cuda.py"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

from ditserve.models.common.loading import checkpoint_files

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_flux_loads_onto_the_gpu(tiny_flux_dev_sharded, monkeypatch, caplog, dtype):
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.weights import flux_key_map, load_flux_dit

    folder = tiny_flux_dev_sharded / "transformer"
    key_map = flux_key_map(FluxConfig.from_json(folder / "config.json"))
    ref = {}
    for key, path in checkpoint_files(folder).items():
        with safe_open(str(path), framework="pt") as f:
            ref[key] = f.get_tensor(key)
    caplog.set_level(logging.INFO, logger="ditserve.models.common.loading")
    for workers in ("1", "8"):
        monkeypatch.setenv("DITSERVE_LOAD_WORKERS", workers)
        dit = load_flux_dit(folder, "cuda", dtype)
        torch.cuda.synchronize()
        for name, p in dit.named_parameters():
            want = torch.cat([ref[k] for k in key_map[name]]).to(dtype)
            assert p.is_cuda and p.dtype == dtype and torch.equal(p.cpu(), want), name
    assert "safetensors instead" not in caplog.text and "GiB/s" in caplog.text


def test_offload_loads_straight_into_pinned_memory(tiny_flux_dev_sharded, caplog):
    from ditserve.models.common.loading import pinned_loading
    from ditserve.models.flux.weights import load_flux_dit

    folder = tiny_flux_dev_sharded / "transformer"
    plain = load_flux_dit(folder, "cpu", torch.float32)
    with pinned_loading():
        pinned = load_flux_dit(folder, "cpu", torch.float32)
    assert "safetensors instead" not in caplog.text
    for (name, p), q in zip(pinned.named_parameters(), plain.parameters()):
        assert p.is_pinned() and not q.is_pinned() and torch.equal(p, q), name
