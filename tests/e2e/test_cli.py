"""`ditserve generate`: files out, perf dump, and every bad input as one line with exit status 2."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditserve.cli.main import main
from ditserve.pipelines.flux import FluxPipeline

SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2", "--max-sequence-length", "16"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ditserve.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_generate_writes_image_and_perf_dump(tiny_flux_dev, tmp_path):
    out, dump = tmp_path / "fox.png", tmp_path / "perf.json"
    res = run_cli("generate", "--model-path", str(tiny_flux_dev), "--prompt", "a fox", "--seed", "3",
                  "--device", "cpu", "--output", str(out), "--perf-dump-path", str(dump), "--log-level", "debug",
                  *SMALL)
    assert res.returncode == 0, res.stderr
    image = Image.open(out)
    assert image.size == (48, 32) and image.format == "PNG"
    perf = json.loads(dump.read_text())
    assert set(perf["stages"]) == {"encode_prompt", "prepare_latents", "timesteps", "denoise", "decode"}
    assert len(perf["steps"]) == 2 and perf["request"]["seed"] == 3
    assert "s/step" in res.stderr  # at debug, the denoise stage logs its average step time

    # the Python API gives the same pixels for the same seed
    from ditserve import Generator

    api = Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype="float32").generate(
        "a fox", seed=3, height=32, width=48, num_inference_steps=2, max_sequence_length=16)
    assert np.array_equal(np.asarray(api.images[0]), np.asarray(image.convert("RGB")))


def test_several_images_numbered_and_formats(tiny_flux_schnell, tmp_path):
    rc = main(["generate", "--model-path", str(tiny_flux_schnell), "--prompt", "owls", "--seed", "1",
               "--num-images", "2", "--output", str(tmp_path / "owl.webp"), *SMALL])
    assert rc == 0
    a, b = Image.open(tmp_path / "owl_0.webp"), Image.open(tmp_path / "owl_1.webp")
    assert a.format == b.format == "WEBP"
    assert main(["generate", "--model-path", str(tiny_flux_schnell), "--prompt", "owls",
                 "--output", str(tmp_path / "owl.jpg"), *SMALL]) == 0
    assert Image.open(tmp_path / "owl.jpg").format == "JPEG"


def test_hugging_face_id_from_offline_cache(tiny_flux_schnell, tmp_path):
    """A repo id resolves through huggingface_hub's cache layout with the network off."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-flux"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_flux_schnell, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.png"
    res = run_cli("generate", "--model-path", "tiny-org/tiny-flux", "--prompt", "lake", "--seed", "0",
                  "--output", str(out), *SMALL, env=env)
    assert res.returncode == 0, res.stderr
    assert Image.open(out).size == (48, 32)
    missing = run_cli("generate", "--model-path", "tiny-org/absent", "--prompt", "x", *SMALL, env=env)
    assert missing.returncode == 2 and "tiny-org/absent" in missing.stderr


@pytest.fixture
def no_model_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded for a bad request")

    monkeypatch.setattr(FluxPipeline, "load", classmethod(forbidden))


def _bad_dirs(tmp_path, tiny_flux_dev):
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "model_index.json").write_text("{not json")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "model_index.json").write_text(json.dumps({"_class_name": "StableCascadePipeline"}))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"missing": str(tmp_path / "absent"), "no_index": str(no_index), "bad_json": str(bad_json),
            "unknown": str(unknown), "file": str(a_file), "good": str(tiny_flux_dev)}


BAD = [
    ("missing", [], "does not exist"),
    ("file", [], "not a directory"),
    ("no_index", [], "model_index.json"),
    ("bad_json", [], "malformed"),
    ("unknown", [], "FluxPipeline"),
    ("good", ["--height", "40"], "multiple of 16"),
    ("good", ["--width", "100000"], "between"),
    ("good", ["--height", "0"], "between"),
    ("good", ["--num-inference-steps", "0"], "num_inference_steps"),
    ("good", ["--guidance-scale", "-1"], "guidance_scale"),
    ("good", ["--true-cfg-scale", "-2"], "true_cfg_scale"),
    ("good", ["--prompt", "   "], "prompt"),
    ("good", ["--num-images", "0"], "num_images"),
    ("good", ["--max-sequence-length", "4096"], "max_sequence_length"),
    ("good", ["--output", "/nonexistent-dir/x.png"], "not writable"),
    ("good", ["--output", "image.gif"], ".png"),
    ("good", ["--perf-dump-path", "/nonexistent-dir/p.json"], "not writable"),
    ("good", ["--height", "abc"], "invalid int"),
    ("good", ["--dtype", "int8"], "invalid choice"),
]


@pytest.mark.parametrize("where,extra,needle", BAD, ids=[f"{w}{''.join(e[:1])}{''.join(e[1:2])}" for w, e, _ in BAD])
def test_bad_input_is_one_line_exit_2(where, extra, needle, tmp_path, tiny_flux_dev, capsys, no_model_work):
    path = _bad_dirs(tmp_path, tiny_flux_dev)[where]
    args = ["generate", "--model-path", path, "--prompt", "a fox", "--output", str(tmp_path / "o.png"), *extra]
    with pytest.raises(SystemExit) if needle.startswith("invalid") else _nothing():
        rc = main(args)
        assert rc == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bad_input_subprocess_no_traceback(tmp_path):
    res = run_cli("generate", "--model-path", str(tmp_path), "--prompt", "x")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "model_index.json" in res.stderr
