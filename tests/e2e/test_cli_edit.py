"""Editing from the command line and the Python API: `--image` in, an edited image out; every bad
input image (or a missing one, or one given to a text-only model) is one line, exit 2, no weights."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from ditserve import Generator
from ditserve.api import GenerationRequest, InvalidRequest
from ditserve.cli.main import main
from ditserve.pipelines.flux import FluxPipeline
from ditserve.pipelines.qwen_image import QwenImagePipeline
from ditserve.pipelines.qwen_image_edit import QwenImageEditPipeline
from ditserve.runtime.loader import inspect_model

SMALL = ["--height", "32", "--width", "32", "--num-inference-steps", "2"]


def write_picture(path, size=(80, 60), fmt=None):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in 60 bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.fixture
def edit_inputs(tmp_path):
    """name -> path of each kind of input image, good and bad."""
    good = write_picture(tmp_path / "good.png")
    data = good.read_bytes()
    files = {"good": good, "good2": write_picture(tmp_path / "good2.png", (60, 60)),
             "missing": tmp_path / "absent.png", "dir": tmp_path}
    for name, content in [("truncated.png", data[: len(data) // 2]), ("text.png", b"not an image at all"),
                          ("empty.png", b""), ("bomb.png", png_header_only(30000, 30000)),
                          ("huge.png", png_header_only(5000, 4000))]:
        (tmp_path / name).write_bytes(content)
        files[name.split(".")[0]] = tmp_path / name
    files["gif"] = write_picture(tmp_path / "in.gif", fmt="GIF")
    files["bmp"] = write_picture(tmp_path / "in.bmp", fmt="BMP")
    files["thin"] = write_picture(tmp_path / "thin.png", (400, 10))
    return files


@pytest.fixture
def no_model_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded for a bad request")

    for cls in (FluxPipeline, QwenImagePipeline, QwenImageEditPipeline):
        monkeypatch.setattr(cls, "load", classmethod(forbidden))


BAD = [
    # (model fixture, --image names, expected text in the one error line)
    ("tiny_qwen_image_edit", [], "edits images"),
    ("tiny_qwen_image_edit", ["missing"], "does not exist"),
    ("tiny_qwen_image_edit", ["dir"], "is a directory"),
    ("tiny_qwen_image_edit", ["text"], "is not an image"),
    ("tiny_qwen_image_edit", ["empty"], "is not an image"),
    ("tiny_qwen_image_edit", ["truncated"], "corrupt or truncated PNG"),
    ("tiny_qwen_image_edit", ["gif"], "GIF; supported: PNG, JPEG, WebP"),
    ("tiny_qwen_image_edit", ["bmp"], "BMP; supported"),
    ("tiny_qwen_image_edit", ["huge"], "5000x4000 = 20000000 pixels; the limit is"),
    ("tiny_qwen_image_edit", ["bomb"], "too large"),
    ("tiny_qwen_image_edit", ["thin"], "sides may differ by at most 16x"),
    ("tiny_qwen_image_edit", ["good", "good2"], "at most 1"),
    ("tiny_qwen_image_edit_plus", ["good"] * 4, "at most 3"),
    ("tiny_qwen_image", ["good"], "text only"),
    ("tiny_flux_dev", ["good"], "text only"),
]


@pytest.mark.parametrize("model,images,needle", BAD, ids=[f"{m.removeprefix('tiny_')}-{'+'.join(i) or 'none'}"
                                                          for m, i, _ in BAD])
def test_bad_input_image_is_one_line_exit_2(request, edit_inputs, tmp_path, capsys, no_model_work,
                                            model, images, needle):
    args = ["generate", "--model-path", str(request.getfixturevalue(model)), "--prompt", "make it blue",
            "--output", str(tmp_path / "out.png"), *SMALL]
    for name in images:
        args += ["--image", str(edit_inputs[name])]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_edit_from_the_cli_equals_the_python_api(tiny_qwen_image_edit, tmp_path, monkeypatch):
    monkeypatch.setattr(QwenImageEditPipeline, "vae_image_area", 128 * 128)  # CPU-sized VAE input
    source = write_picture(tmp_path / "in.jpg", (90, 60), fmt="JPEG")
    out, dump = tmp_path / "edited.png", tmp_path / "perf.json"
    rc = main(["generate", "--model-path", str(tiny_qwen_image_edit), "--image", str(source), "--prompt",
               "make it blue", "--negative-prompt", " ", "--seed", "4", "--output", str(out),
               "--perf-dump-path", str(dump), *SMALL])
    assert rc == 0
    perf = json.loads(dump.read_text())
    assert perf["request"]["images"] == ["90x60"] and len(perf["steps"]) == 2

    gen = Generator.from_pretrained(tiny_qwen_image_edit, device="cpu", dtype="float32")
    api = gen.generate("make it blue", negative_prompt=" ", seed=4, height=32, width=32, num_inference_steps=2,
                       images=Image.open(source))
    cli = np.asarray(Image.open(out).convert("RGB"))
    assert np.array_equal(np.asarray(api.images[0]), cli)
    other = gen.generate("make it blue", negative_prompt=" ", seed=4, height=32, width=32, num_inference_steps=2,
                         images=[Image.new("RGB", (90, 60), (200, 30, 30))])
    assert np.abs(np.asarray(other.images[0]).astype(int) - cli.astype(int)).max() > 2  # the input image matters

    with pytest.raises(InvalidRequest, match="edits images"):
        gen.generate("no image given", num_inference_steps=2)


def test_requests_carry_checked_images(tiny_qwen_image_edit):
    source = inspect_model(tiny_qwen_image_edit)
    limits = source.pipeline_cls.limits
    with pytest.raises(InvalidRequest, match="must be a PIL image"):
        GenerationRequest("x", images=(b"raw bytes",)).resolve(source.defaults, limits)
    with pytest.raises(InvalidRequest, match="tuple of PIL images"):
        GenerationRequest("x", images=Image.new("RGB", (8, 8))).resolve(source.defaults, limits)
    req = GenerationRequest("x", images=[Image.new("RGB", (300, 200))]).resolve(source.defaults, limits)
    assert isinstance(req.images, tuple) and (req.width, req.height) == (1248, 832)


def test_read_image_decodes_supported_formats():
    from ditserve.api.images import read_image
    from ditserve.api.request import ModelLimits

    limits = ModelLimits(max_images=1)
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGBA" if fmt != "JPEG" else "L", (20, 10), 128).save(buf, format=fmt)
        image = read_image(buf.getvalue(), fmt, limits)
        assert image.mode == "RGB" and image.size == (20, 10)


@pytest.mark.parametrize("model", ["tiny_qwen_image", "tiny_qwen_image_edit", "tiny_qwen_image_edit_plus"])
def test_compile_warmup_request_is_valid(request, monkeypatch, model):
    """`--enable-torch-compile` warms up at the default size; edit models get an input image."""
    from ditserve.runtime.engine import Engine

    source = inspect_model(request.getfixturevalue(model))
    engine = Engine(object.__new__(source.pipeline_cls), source)  # no weights: the run is captured
    seen = []
    monkeypatch.setattr(engine, "run_batch", lambda reqs, control=None: seen.extend(reqs) or [None])
    engine.warmup(engine.default_warmups(max_batch_size=1))
    (req,) = seen
    assert len(req.images) == source.pipeline_cls.limits.min_images
    assert (req.width, req.height) == (1024, 1024) and req.num_inference_steps == 2


def test_one_step_is_refused_where_the_schedule_ends_at_a_terminal_sigma(tiny_qwen_image, tiny_flux_dev, tmp_path,
                                                                         capsys, no_model_work):
    """Qwen-Image's scheduler stretches its sigmas to end at shift_terminal; with 1 step that is 0/0
    (diffusers draws NaNs). Refused in one line, exit 2, before any weights load; FLUX's schedule has
    no terminal, so 1 step stays allowed there."""
    assert inspect_model(tiny_qwen_image).limits.min_steps == 2
    assert inspect_model(tiny_flux_dev).limits.min_steps == 1
    rc = main(["generate", "--model-path", str(tiny_qwen_image), "--prompt", "a fox", "--height", "32",
               "--width", "32", "--num-inference-steps", "1", "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert rc == 2 and len(lines) == 1, err
    assert "num_inference_steps must be between 2 and" in lines[0] and "terminal sigma" in lines[0]
    with pytest.raises(InvalidRequest, match="between 2"):
        GenerationRequest(prompt="a fox", num_inference_steps=1).resolve(
            QwenImagePipeline.defaults, inspect_model(tiny_qwen_image).limits)
