"""The DiT loader (models/common/loading.py): checkpoint tensors read in parallel straight into each
parameter's final tensor — the same values as safetensors' own reader gives (sharded FLUX folder,
Wan's float32 set, dtype conversion, any thread count), nothing read twice or copied after the read,
peak RSS of a load no more than the weights' own; the engine reports its load time in the first
run's Timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ditserve.models.common import loading
from ditserve.models.common.loading import checkpoint_files, read_entries

ROOT = Path(__file__).resolve().parents[2]


def _reference(folder: Path, ignore=lambda key: False) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor as safetensors reads it."""
    out = {}
    for key, path in checkpoint_files(folder).items():
        if not ignore(key):
            with safe_open(str(path), framework="pt") as f:
                out[key] = f.get_tensor(key)
    return out


def _expected(key_map, ref, name, dtype):
    parts = [ref[k] for k in key_map[name]]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_flux_loads_the_checkpoint_values(tiny_flux_dev_sharded, monkeypatch, dtype):
    from ditserve.models.flux.config import FluxConfig
    from ditserve.models.flux.weights import flux_key_map, load_flux_dit

    folder = tiny_flux_dev_sharded / "transformer"
    assert len(set(checkpoint_files(folder).values())) > 1  # sharded
    ref = _reference(folder)
    key_map = flux_key_map(FluxConfig.from_json(folder / "config.json"))
    for workers in ("1", "4"):
        monkeypatch.setenv("DITSERVE_LOAD_WORKERS", workers)
        dit = load_flux_dit(folder, "cpu", dtype)
        for name, p in dit.named_parameters():
            assert p.dtype == dtype and not p.requires_grad
            assert torch.equal(p, _expected(key_map, ref, name, dtype)), name


def test_wan_keeps_its_float32_set(tiny_wan):
    from ditserve.models.wan.config import WanConfig
    from ditserve.models.wan.weights import IGNORED, keeps_float32, load_wan_dit, wan_key_map

    folder = tiny_wan() / "transformer"
    ref = _reference(folder, lambda key: IGNORED.search(key) is not None)
    key_map = wan_key_map(WanConfig.from_json(folder / "config.json"))
    dit = load_wan_dit(folder, "cpu", torch.bfloat16)
    kept = 0
    for name, p in dit.named_parameters():
        dtype = torch.float32 if keeps_float32(key_map[name][0]) else torch.bfloat16
        kept += dtype == torch.float32
        assert p.dtype == dtype and torch.equal(p, _expected(key_map, ref, name, dtype)), name
    assert kept > 0


def test_each_tensor_is_read_straight_into_its_parameter(tiny_flux_dev_sharded, monkeypatch):
    """No intermediate copy: every byte lands where the parameter's storage is (a fused q/k/v's parts in
    their slices), and each checkpoint tensor is read exactly once."""
    from ditserve.models.flux.weights import load_flux_dit

    folder = tiny_flux_dev_sharded / "transformer"
    reads: list[tuple[str, int, int]] = []  # (key's file offset, address, bytes)
    original = loading._Files.read

    def read(self, entry, out):
        import ctypes

        address = ctypes.addressof(ctypes.c_char.from_buffer(out)) if entry.nbytes else 0
        reads.append((entry.offset, address, entry.nbytes))
        return original(self, entry, out)

    monkeypatch.setattr(loading._Files, "read", read)
    dit = load_flux_dit(folder, "cpu", torch.float32)  # the tiny folder is float32: no conversion
    entries = read_entries(checkpoint_files(folder))
    assert sorted(r[0] for r in reads) == sorted(e.offset for e in entries.values())  # each once
    spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * 4) for p in dit.parameters())
    for _, address, size in reads:
        assert any(a <= address and address + size <= b for a, b in spans)


LOAD_RSS = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
folder = Path(sys.argv[1])
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
from ditserve.models.common.loading import load_into
from torch import nn
class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2048, 4096), nn.Linear(4096, 2048)
with torch.device("meta"):
    m = M()
key_map = {n: [n] for n, _ in m.named_parameters()}
open("/proc/self/clear_refs", "w").write("5")
before = rss()
load_into(m, folder, key_map, "cpu", torch.float32)
weights = sum(p.numel() * 4 for p in m.parameters())
print(json.dumps({"weights": weights, "extra": hwm() - before - weights}))
"""


@pytest.mark.slow  # a fresh process (imports torch) and 64 MB written
def test_peak_rss_of_a_load_is_the_weights_own(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(4096, 2048), "a.bias": torch.randn(4096),
               "b.weight": torch.randn(2048, 4096), "b.bias": torch.randn(2048)}
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    out = subprocess.run([sys.executable, "-c", LOAD_RSS, str(tmp_path)], capture_output=True, text=True,
                         cwd=str(ROOT), check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["weights"] == 64 * 2**20 + 6144 * 4
    assert got["extra"] < 0.25 * got["weights"]  # a second copy would be ≈ the weights' size


def test_engine_reports_load_time_in_the_first_run(tiny_flux_dev):
    from ditserve import Generator

    gen = Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype=torch.float32)
    request = dict(prompt="a fox", height=32, width=32, num_inference_steps=1, seed=1, max_sequence_length=16)
    first = gen.generate(**request).timings
    assert set(first.load) == {"weights", "setup", "warmup", "total"} and first.load["weights"] > 0
    assert first.to_dict()["load_s"]["total"] >= first.load["weights"]
    second = gen.generate(**request).timings
    assert second.load is None and "load_s" not in second.to_dict()


def test_a_failed_parallel_read_falls_back_to_safetensors(tiny_flux_dev_sharded, monkeypatch, caplog):
    from ditserve.models.flux.weights import load_flux_dit

    folder = tiny_flux_dev_sharded / "transformer"
    good = load_flux_dit(folder, "cpu", torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("no pinned memory")

    monkeypatch.setattr(loading, "read_parameter", broken)
    dit = load_flux_dit(folder, "cpu", torch.float32)
    assert "reading it through safetensors instead" in caplog.text
    for (name, p), q in zip(dit.named_parameters(), good.parameters()):
        assert torch.equal(p, q), name
