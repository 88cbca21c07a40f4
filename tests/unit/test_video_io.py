"""Video files through PyAV: frame count, size and rate survive the round trip, pixels stay close."""

import numpy as np
import pytest

from ditserve.runtime.video_io import encode_video, read_video, write_video


def moving_square(frames=9, h=48, w=64) -> np.ndarray:
    video = np.zeros((frames, h, w, 3), np.uint8)
    video[..., 2] = 200  # blue background
    for i in range(frames):
        video[i, 16:32, 4 * i:4 * i + 16] = (220, 30, 30)
    return video


@pytest.mark.parametrize("fmt, tolerance", [("mp4", 12), ("webm", 16), ("gif", 40)])
def test_round_trip_keeps_frames_size_and_rate(fmt, tolerance):
    video = moving_square()
    decoded, rate = read_video(encode_video(video, fps=16, fmt=fmt))
    assert decoded.shape == video.shape
    if fmt != "gif":  # GIF stores delays in 1/100 s: 16 fps is not exact
        assert rate == 16
    assert np.abs(decoded.astype(int) - video).mean() < tolerance / 4
    # the square moves: frame 0 and frame 8 differ where it was
    assert np.abs(decoded[0, 20:28, 4:12].astype(int) - decoded[8, 20:28, 4:12]).mean() > 50


def test_png_writes_numbered_lossless_frames(tmp_path):
    from PIL import Image

    video = moving_square(frames=3)
    written = write_video(video, tmp_path / "clip.png", fps=8)
    assert [p.name for p in written] == ["clip_0000.png", "clip_0001.png", "clip_0002.png"]
    assert np.array_equal(np.asarray(Image.open(written[2])), video[2])


def test_bad_frames_and_formats_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((2, 8, 8, 3), np.float32), 8)
    with pytest.raises(ValueError, match="unknown video format"):
        encode_video(moving_square(), 8, "avi")
