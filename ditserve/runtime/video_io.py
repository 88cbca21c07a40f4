"""Video files from frames (PyAV), for the edges: the CLI writes them, the server serves them.

Frames are uint8 [F, H, W, 3]. MP4 is H.264 in yuv420p (what every player takes), WebM is VP9, GIF
is palette-quantised per frame by Pillow (better colours than a fixed 3-3-2 palette); a `.png` path writes lossless frames `name_0000.png`, `name_0001.png`, ...
"""

from __future__ import annotations

import io
import logging
from fractions import Fraction
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VIDEO_FORMATS = ("mp4", "webm", "gif")
# (container, codec, pixel format, codec options): quality close to visually lossless, as people
# expect from a generator's output (H.264 crf 18, VP9 crf 30 at constant quality)
_CODECS = {
    "mp4": ("mp4", "libx264", "yuv420p", {"crf": "18", "preset": "medium"}),
    "webm": ("webm", "libvpx-vp9", "yuv420p", {"crf": "30", "b": "0"}),
}


def encode_video(frames: np.ndarray, fps: int, fmt: str = "mp4") -> bytes:
    """The frames as a video file's bytes in `fmt` (mp4, webm or gif) at `fps` frames per second."""
    import av

    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; use one of {', '.join(VIDEO_FORMATS)}")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    if fmt == "gif":
        return _gif(frames, fps)
    container_fmt, codec, pix_fmt, options = _CODECS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = options
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _gif(frames: np.ndarray, fps: int) -> bytes:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def write_video(frames: np.ndarray, path: str | Path, fps: int) -> list[Path]:
    """Write `frames` to `path` by its suffix (.mp4, .webm, .gif, or .png for numbered frames);
    returns the files written."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "png":
        from PIL import Image

        written = []
        for i, frame in enumerate(frames):
            out = path.with_name(f"{path.stem}_{i:04d}.png")
            Image.fromarray(frame).save(out)
            written.append(out)
        return written
    path.write_bytes(encode_video(frames, fps, suffix))
    log.debug("wrote %s (%d frames at %d fps)", path, len(frames), fps)
    return [path]


def read_video(data: bytes) -> tuple[np.ndarray, Fraction]:
    """Decode a video file's bytes into uint8 frames [F, H, W, 3] and its frame rate (tests, checks)."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), stream.average_rate


def thumbnail(frames: np.ndarray) -> bytes:
    """The first frame as WebP (what `/content?variant=thumbnail` serves)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def spritesheet(frames: np.ndarray, columns: int = 8, max_tiles: int = 32) -> bytes:
    """Up to `max_tiles` evenly spaced frames on a grid, as JPEG (`variant=spritesheet`)."""
    from PIL import Image

    picks = np.linspace(0, len(frames) - 1, min(len(frames), max_tiles)).round().astype(int)
    rows = -(-len(picks) // columns)
    cols = min(columns, len(picks))
    h, w = frames.shape[1:3]
    sheet = np.zeros((rows * h, cols * w, 3), np.uint8)
    for k, i in enumerate(picks):
        r, c = divmod(k, columns)
        sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = frames[i]
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="JPEG", quality=85)
    return buf.getvalue()
