"""Decode and validate image payloads into the one image contract: uint8 H x W x C, C in {1, 3}.

Every failure is an :class:`~core.errors.ImageError` whose message says what to fix and
whose ``status`` is the HTTP status to answer with (400 malformed, 413 too large,
415 unsupported type).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from core.errors import ImageError

MAX_IMAGE_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 4096 * 4096

_SUPPORTED = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_KNOWN_UNSUPPORTED = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP",
}


def sniff_format(data: bytes) -> str | None:
    """'PNG' or 'JPEG' from the magic bytes; raises 415 for other known image formats."""
    for magic, name in _SUPPORTED.items():
        if data.startswith(magic):
            return name
    for magic, name in _KNOWN_UNSUPPORTED.items():
        if data.startswith(magic):
            raise ImageError(f"{name} images are not supported; send PNG or JPEG", status=415)
    return None


def decode_image(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES) -> NDArray[np.uint8]:
    """PNG or JPEG bytes -> uint8 (H, W, C). Grey stays 1 channel; colour becomes 3."""
    if not data:
        raise ImageError("the image is empty; send PNG or JPEG bytes")
    if len(data) > max_bytes:
        raise ImageError(
            f"the image is {len(data)} bytes; the limit is {max_bytes} bytes", status=413
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("the bytes are not a PNG or JPEG image")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"the image is {img.width}x{img.height}; at most {MAX_PIXELS} pixels",
                    status=413,
                )
            img.load()
            return _to_array(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the {fmt} image is truncated or corrupt ({exc})") from None


def _to_array(img: Image.Image) -> NDArray[np.uint8]:
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    if img.mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"image mode {img.mode} is not supported; send 8-bit grey or RGB")


def image_from_pixels(pixels: Any) -> NDArray[np.uint8]:
    """Nested lists (H x W, or H x W x C) of numbers in 0..255 -> uint8 (H, W, C)."""
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except (ValueError, TypeError):
        raise ImageError(
            "pixels must be a rectangular nested list of numbers (H x W or H x W x C)"
        ) from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(
            f"pixels have shape {list(arr.shape)}; expected H x W or H x W x C with C 1 or 3"
        )
    if arr.size > MAX_PIXELS:
        raise ImageError(f"pixels hold {arr.size} values; at most {MAX_PIXELS}", status=413)
    if not np.isfinite(arr).all():
        raise ImageError("pixels contain NaN or infinity; use numbers in 0..255")
    if arr.min() < 0 or arr.max() > 255:
        raise ImageError(f"pixels range {arr.min():g}..{arr.max():g}; values must lie in 0..255")
    if not np.array_equal(arr, np.round(arr)):
        raise ImageError("pixels must be whole numbers in 0..255")
    return arr.astype(np.uint8)


def check_shape(image: NDArray[np.uint8], expected: Sequence[int]) -> None:
    """Raise 400 unless ``image`` (H, W, C) has exactly the model's ``expected`` shape."""
    h, w, c = expected
    if image.shape != (h, w, c):
        got = "x".join(str(d) for d in image.shape)
        raise ImageError(
            f"the image is {got} (HxWxC) but the model expects {h}x{w}x{c}"
            + (
                f"; convert it to {'grey' if c == 1 else 'RGB'} first"
                if image.shape[:2] == (h, w)
                else ""
            )
        )


def encode_png(image: NDArray[np.uint8]) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (lossless, so the pixels round-trip exactly)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ImageError(f"cannot encode {image.dtype} {image.shape} as PNG")
    mode_img = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(mode_img).save(buf, format="PNG")
    return buf.getvalue()
