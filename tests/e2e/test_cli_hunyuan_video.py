"""`ditserve generate` with a HunyuanVideo folder (true CFG) writes the MP4 at its 24 fps (bad frame counts:
tests/parity/test_hunyuan_video_pipeline.py; the CLI's exit 2 for them: test_cli_video.py)."""

from ditserve.cli.main import main
from ditserve.runtime.video_io import read_video

SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "2", "--num-frames", "5"]


def test_mp4_has_the_frames_size_and_rate(tiny_hunyuan_video, tmp_path):
    out = tmp_path / "clip.mp4"
    # in process (the CLI's `main`; tests/e2e/test_cli_video.py runs a video generate as a real process)
    assert main(["generate", "--model-path", str(tiny_hunyuan_video), "--prompt", "a cat", "--output", str(out),
                 "--negative-prompt", "blurry", "--true-cfg-scale", "3", *SMALL]) == 0
    frames, rate = read_video(out.read_bytes())
    assert frames.shape == (5, 32, 48, 3) and rate == 24
