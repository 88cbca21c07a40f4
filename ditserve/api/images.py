"""Input images at the edges (CLI files, HTTP uploads): decode and check before any model work.

Bytes in, an RGB PIL image out (RGBA for a layered model, which splits the alpha channel
too), or InvalidRequest naming what is wrong: too many bytes, not an
image (or a corrupt one), a format we do not take, or too many pixels. The pixel count is read
from the header before the image is decoded, so a small file that would decode to a huge image
(a "decompression bomb") is refused without the memory it would cost.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ditserve.api.errors import InvalidRequest
from ditserve.api.request import ModelLimits

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def read_image(data: bytes, name: str, limits: ModelLimits, param: str = "image") -> Image.Image:
    """Decode one uploaded image (PNG, JPEG or WebP) to RGB (RGBA for a layered model), or raise
    InvalidRequest naming `name`."""
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidRequest(f"{name} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(_unreadable(name, exc), param) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"{name} is not a readable image ({type(exc).__name__})", param) from None
    if image.format not in FORMATS:
        raise InvalidRequest(f"{name} is {image.format or 'an unknown format'}; supported: "
                             f"{', '.join(FORMATS.values())}", param)
    width, height = image.size
    if width * height > limits.max_input_pixels:
        raise InvalidRequest(f"{name} is {width}x{height} = {width * height} pixels; "
                             f"the limit is {limits.max_input_pixels}", param)
    try:
        image.load()
        return image.convert("RGBA" if limits.max_layers else "RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequest(f"{name} is a corrupt or truncated {FORMATS[image.format]} image "
                             f"({type(exc).__name__})", param) from None


def _unreadable(name: str, exc: Exception) -> str:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"{name} is too large to decode ({exc})"
    return f"{name} is not an image (supported: {', '.join(FORMATS.values())})"
