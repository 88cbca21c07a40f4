"""`ditserve generate` with a Wan folder writes video files: the MP4 decodes to the right frame count,
size and fps, and equals the Python API's frames up to H.264 loss; bad video input is one line, exit 2."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditserve.cli.main import main
from ditserve.pipelines.wan import WanPipeline
from ditserve.runtime.video_io import read_video

SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2", "--max-sequence-length", "16"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ditserve.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_mp4_has_the_frames_size_and_rate(tiny_wan, tmp_path):
    out = tmp_path / "clip.mp4"
    res = run_cli("generate", "--model-path", str(tiny_wan("t2v")), "--prompt", "a cat", "--seed", "2",
                  "--num-frames", "9", "--fps", "12", "--output", str(out), *SMALL)
    assert res.returncode == 0, res.stderr
    frames, rate = read_video(out.read_bytes())
    assert frames.shape == (9, 32, 48, 3) and rate == 12

    from ditserve import Generator
    from ditserve.api import GenerationRequest

    gen = Generator.from_pretrained(tiny_wan("t2v"), device="cpu", dtype="float32")
    same, other = (gen.engine.generate(GenerationRequest(
        prompt="a cat", seed=seed, num_frames=9, fps=12, height=32, width=48, num_inference_steps=2,
        max_sequence_length=16)).videos[0].astype(int) for seed in (2, 3))
    # the same video through H.264 (4:2:0 chroma costs a few levels on these noisy tiny frames)
    loss = np.abs(frames.astype(int) - same).mean()
    assert loss < 12 and loss < 0.5 * np.abs(frames.astype(int) - other).mean()


@pytest.mark.parametrize("suffix", [".webm", ".gif"])
def test_other_containers(tiny_wan, tmp_path, suffix):
    out = tmp_path / f"clip{suffix}"
    # in process (the CLI's `main`): test_mp4_has_the_frames_size_and_rate runs it as a real process
    assert main(["generate", "--model-path", str(tiny_wan("t2v")), "--prompt", "a cat", "--num-frames", "5",
                 "--output", str(out), *SMALL]) == 0
    assert read_video(out.read_bytes())[0].shape == (5, 32, 48, 3)


def test_png_frames_and_image_to_video(tiny_wan, tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")).save(image)
    assert main(["generate", "--model-path", str(tiny_wan("i2v")), "--prompt", "a cat", "--image", str(image),
                 "--num-frames", "5", "--output", str(tmp_path / "f.png"), *SMALL]) == 0
    assert sorted(p.name for p in tmp_path.glob("f_*.png")) == [f"f_{i:04d}.png" for i in range(5)]


@pytest.fixture
def no_model_work(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("model weights were loaded for a bad request")

    monkeypatch.setattr(WanPipeline, "load", classmethod(forbidden))


@pytest.mark.parametrize("args, needle", [
    (["--num-frames", "8"], "num_frames"), (["--output", "x.jpg"], ".mp4"), (["--fps", "0"], "fps"),
    (["--sampler", "ddim"], "sampler"), (["--flow-shift", "-1"], "flow_shift"),
])
def test_bad_video_input_is_one_line_exit_2(tiny_wan, tmp_path, args, needle, capsys, no_model_work):
    """In process (the CLI's own `main`, as tests/e2e/test_cli.py's bad-input table; a fresh process
    per case costs ~4 s of imports): exit 2, one line, no traceback, and no weights loaded.
    test_bad_video_input_in_a_process_is_one_line runs one case as a real process."""
    folder = str(tiny_wan("t2v"))
    capsys.readouterr()  # the tiny folder's build (first use in a session) writes progress bars
    try:
        rc = main(["generate", "--model-path", folder, "--prompt", "a cat", *SMALL,
                   *(a if a != "x.jpg" else str(tmp_path / a) for a in args)])
    except SystemExit as exit_:  # argparse's own refusals (an unknown --sampler choice)
        rc = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_bad_video_input_in_a_process_is_one_line(tiny_wan):
    res = run_cli("generate", "--model-path", str(tiny_wan("t2v")), "--prompt", "a cat", *SMALL, "--num-frames", "8")
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "num_frames" in lines[0], res.stderr


def test_sampler_and_flow_shift_reach_the_request(tiny_wan, tmp_path):
    """A valid --sampler / --flow-shift is the request's: the CLI's frames (PNG, lossless) equal the
    Python API's with the same override, and differ from the folder's own solver and shift."""
    from ditserve import Generator
    from ditserve.api import GenerationRequest

    assert main(["generate", "--model-path", str(tiny_wan("t2v")), "--prompt", "a cat", "--seed", "4",
                 "--num-frames", "5", "--sampler", "euler", "--flow-shift", "2.5",
                 "--output", str(tmp_path / "f.png"), *SMALL]) == 0
    frames = np.stack([np.asarray(Image.open(tmp_path / f"f_{i:04d}.png")) for i in range(5)]).astype(int)
    gen = Generator.from_pretrained(tiny_wan("t2v"), device="cpu", dtype="float32")
    base = dict(prompt="a cat", seed=4, num_frames=5, height=32, width=48, num_inference_steps=2,
                max_sequence_length=16)
    same = gen.engine.generate(GenerationRequest(**base, sampler="euler", flow_shift=2.5)).videos[0].astype(int)
    folder = gen.engine.generate(GenerationRequest(**base)).videos[0].astype(int)
    assert np.abs(frames - same).max() <= 1
    assert np.abs(frames - folder).max() > 1
