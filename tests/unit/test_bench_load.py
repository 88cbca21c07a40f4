"""The load bench on the CPU at toy size: the Wan2.1-T2V-14B path writes a random diffusers folder at
the real config (2 layers, width 256 here), loads it in fresh processes and reports every weight it
wrote; ditserve's Wan loader reads back exactly the written values."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCHMARKS = str(Path(__file__).resolve().parents[2] / "benchmarks")
ROW_KEYS = {"model", "gpu", "device", "dtype", "file_dtype", "shape", "params", "weights_gib", "shards", "load_s",
            "cold_s", "gib_per_s", "extra_rss_gib", "workers", "commit"}
WAN_TINY = ["--model", "wan2.1-t2v-14b", "--layers", "2", "--dim", "256"]


def _bench():
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module("bench_load")


def _written(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out |= {key: f.get_tensor(key) for key in f.keys()}
    return out


def test_tiny_wan_row_counts_every_written_weight(tmp_path):
    folder, out = tmp_path / "transformer", tmp_path / "load.json"
    # shards of ≈ 2 MB: the 6.9 MB toy model is split over several files, as the 14B one is
    _bench().main([*WAN_TINY, "--reps", "1", "--shard-gb", "0.002", "--folder", str(folder), "--out", str(out)])
    row = json.loads(out.read_text())
    assert ROW_KEYS <= set(row) and row["model"] == "wan2.1-t2v-14b" and row["shape"] == "2 layers, width 256"
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "WanTransformer3DModel" and config["num_layers"] == 2
    assert (config["num_attention_heads"], config["attention_head_dim"], config["ffn_dim"]) == (2, 128, 691)
    assert config["text_dim"] == 4096 and config["patch_size"] == [1, 2, 2]  # the rest is Wan2.1-T2V-14B's
    written = _written(folder)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written) and row["shards"] == len(set(index["weight_map"].values())) > 1
    assert row["params"] == sum(t.numel() for t in written.values())  # every written weight was loaded
    # bf16, but for the tensors diffusers keeps in float32 (time embedder, modulation tables, norm2)
    from ditserve.models.wan.weights import keeps_float32

    nbytes = sum(t.numel() * (4 if keeps_float32(k) else 2) for k, t in written.items())
    assert row["weights_gib"] * 2**30 == nbytes
    assert row["load_s"] > 0 and row["cold_s"] > 0 and "diffusers_load_s" not in row


def test_wan_loader_reads_the_written_values(tmp_path):
    from ditserve.models.wan.weights import load_wan_dit, wan_key_map

    bench, folder = _bench(), tmp_path / "transformer"
    config = {"_class_name": "WanTransformer3DModel", **bench.wan_arch(1, 128)}
    n = bench.write_folder(folder, config, "bfloat16", shard_gb=0.001)
    written = _written(folder)
    assert n == sum(t.numel() for t in written.values()) and len(list(folder.glob("*.safetensors"))) > 1
    dit = load_wan_dit(folder, "cpu", torch.bfloat16)
    params, key_map = dict(dit.named_parameters()), wan_key_map(dit.cfg)
    assert set(key_map) == set(params) and {k for (k,) in key_map.values()} == set(written)
    for name, (key,) in key_map.items():  # float32 ones hold the bf16 values exactly
        assert torch.equal(params[name].float(), written[key].float().reshape(params[name].shape)), name


def test_bad_width_or_another_models_folder_is_refused(tmp_path):
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--model", "wan2.1-t2v-14b", "--dim", "200"])  # not a multiple of the head dim
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(SystemExit):
        bench.main([*WAN_TINY, "--folder", str(folder)])


@pytest.mark.slow
def test_tiny_wan_compare_times_every_reader(tmp_path):
    out = tmp_path / "load.json"
    _bench().main([*WAN_TINY, "--reps", "1", "--compare", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["safetensors_load_s"] > 0 and row["diffusers_load_s"] > 0
    assert {"safetensors_extra_rss_gib", "diffusers_extra_rss_gib"} <= set(row)
