"""`/v1/videos` serves a tiny HunyuanVideo folder: the same video as the Python API, and its frame rule
(4k + 1) refused with a 400 before any job. Slow: run with -m slow."""

from __future__ import annotations

import numpy as np
import pytest
from live_server import API_KEY, assert_envelope, start
from openai import OpenAI

from ditserve.runtime.video_io import read_video


@pytest.mark.slow  # a server process: ~15 s; the engine path is covered by tests/parity/test_hunyuan_video_pipeline.py
def test_hunyuan_video_job_matches_the_python_api(tiny_hunyuan_video, tmp_path):
    live = start(tiny_hunyuan_video, tmp_path / "server.log", "--data-dir", str(tmp_path / "jobs"), api_key=API_KEY)
    try:
        c = OpenAI(base_url=f"{live.url}/v1", api_key=API_KEY, max_retries=0)
        video = c.videos.create_and_poll(prompt="a cat walks", poll_interval_ms=100,
                                         extra_body={"size": "48x32", "num_frames": "9", "num_inference_steps": "2",
                                                     "seed": "3"})
        assert video.status == "completed", video.error
        frames, rate = read_video(c.videos.download_content(video.id).read())
        assert frames.shape == (9, 32, 48, 3) and rate == 24
        r = live.http.post("/v1/videos", data={"prompt": "x", "num_frames": "8", "size": "48x32"})
        assert "4k+1" in assert_envelope(r, 400)["message"]
    finally:
        live.stop()

    from ditserve import Generator
    from ditserve.api import GenerationRequest

    api = Generator.from_pretrained(tiny_hunyuan_video, device="cpu", dtype="float32").engine.generate(
        GenerationRequest(prompt="a cat walks", seed=3, num_frames=9, height=32, width=48,
                          num_inference_steps=2)).videos[0]
    # the MP4 is lossy: compare per-frame colours
    assert np.abs(frames.mean(axis=(1, 2)) - api.mean(axis=(1, 2))).max() < 6
