"""Qwen-Image-Layered from the command line: an RGBA `--image` in, one RGBA PNG per layer out (the
input's alpha read, the layers' alpha kept), equal to the Python API; formats without alpha and
`--layers` for other models are one line, exit 2."""

import json

import numpy as np
import pytest
from PIL import Image

from ditserve import Generator
from ditserve.cli.main import main

SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2", "--seed", "3"]


def rgba_file(path):
    y, x = np.mgrid[0:30, 0:40] / 40
    rgba = np.stack([x, y, x * y, ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05) * 0.8 + 0.1], axis=-1)
    Image.fromarray((rgba * 255).astype("uint8"), "RGBA").save(path)
    return path


def test_one_png_per_layer_equals_the_python_api(tiny_qwen_image_layered, tmp_path):
    source = rgba_file(tmp_path / "in.png")
    out, dump = tmp_path / "split.png", tmp_path / "perf.json"
    rc = main(["generate", "--model-path", str(tiny_qwen_image_layered), "--image", str(source), "--prompt",
               "a cat on a mat", "--negative-prompt", " ", "--layers", "2", "--output", str(out),
               "--perf-dump-path", str(dump), *SMALL])
    assert rc == 0
    files = [tmp_path / "split_layer0.png", tmp_path / "split_layer1.png"]
    assert sorted(tmp_path.glob("split*.png")) == files
    assert [o["layer"] for o in json.loads(dump.read_text())["outputs"]] == [0, 1]
    cli = [Image.open(f) for f in files]
    assert all(im.mode == "RGBA" and im.size == (48, 32) for im in cli)

    gen = Generator.from_pretrained(tiny_qwen_image_layered, device="cpu", dtype="float32")
    api = gen.generate("a cat on a mat", negative_prompt=" ", seed=3, height=32, width=48, num_inference_steps=2,
                       layers=2, images=Image.open(source)).images
    for a, c in zip(api, cli):
        assert np.array_equal(np.asarray(a), np.asarray(c))
    opaque = gen.generate("a cat on a mat", negative_prompt=" ", seed=3, height=32, width=48, num_inference_steps=2,
                          layers=2, images=Image.open(source).convert("RGB")).images
    assert any(not np.array_equal(np.asarray(a), np.asarray(o)) for a, o in zip(api, opaque))  # alpha was read


@pytest.mark.parametrize("model,extra,needle", [
    ("tiny_qwen_image_layered", ["--output", "out.jpg"], "must end in one of .png, .webp"),
    ("tiny_qwen_image_layered", ["--layers", "0"], "layers must be between 1 and 16"),
    ("tiny_qwen_image_edit", ["--layers", "3"], "layers is for layered models"),
], ids=["jpeg", "zero-layers", "not-layered"])
def test_bad_layer_requests_are_one_line_exit_2(request, tmp_path, capsys, monkeypatch, model, extra, needle):
    monkeypatch.chdir(tmp_path)
    args = ["generate", "--model-path", str(request.getfixturevalue(model)), "--prompt", "x",
            "--image", str(rgba_file(tmp_path / "in.png")), *SMALL, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and needle in lines[0], err
