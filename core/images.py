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


class DecodeBudget:
    """Decoded bytes one request may still spend: a request of many small compressed images
    cannot unpack into gigabytes (issue 31)."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.limit = max_bytes

    def spend(self, nbytes: int) -> None:
        if nbytes > self.left:
            raise ImageError(
                f"the request decodes to more than {self.limit} bytes of pixels; send fewer "
                "or smaller images",
                status=413,
            )
        self.left -= nbytes


def decode_image(
    data: bytes,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    expect: Sequence[int] | None = None,
    budget: DecodeBudget | None = None,
) -> NDArray[np.uint8]:
    """PNG or JPEG bytes -> uint8 (H, W, C). Grey stays 1 channel; colour becomes 3.

    The header is checked before any pixel is decoded: its size against ``expect`` (the
    model's H, W, C) and ``budget``, because a 48 KB PNG can declare 4096x4096 pixels.
    """
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
            channels = _channels(img.mode)
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(
                    f"the image is {img.width}x{img.height}; at most {MAX_PIXELS} pixels",
                    status=413,
                )
            if expect is not None:
                _check_dims((img.height, img.width, channels), expect)
            if budget is not None:
                budget.spend(img.width * img.height * channels)
            img.load()
            return _to_array(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"the image declares more than {MAX_PIXELS} pixels", status=413) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"the {fmt} image is truncated or corrupt ({exc})") from None


def _channels(mode: str) -> int:
    if mode in ("1", "L", "LA"):
        return 1
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        return 3
    raise ImageError(f"image mode {mode} is not supported; send 8-bit grey or RGB")


def _to_array(img: Image.Image) -> NDArray[np.uint8]:
    if _channels(img.mode) == 1:
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _check_leaves(pixels: Any, limit: int) -> None:
    """Every leaf a JSON number (not a bool or a string), and at most ``limit`` of them.

    Walked before numpy sees the lists, because numpy silently turns ``"255"`` and ``true``
    into pixels and would allocate for any size."""
    stack, seen = [pixels], 0
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            seen += 1
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise ImageError(
                f"pixels must be numbers in 0..255, not {type(item).__name__} ({str(item)[:20]!r})"
            )
        else:
            seen += 1
        if seen > limit:
            raise ImageError(f"pixels hold more than {limit} values", status=413)


def image_from_pixels(
    pixels: Any, *, expect: Sequence[int] | None = None, budget: DecodeBudget | None = None
) -> NDArray[np.uint8]:
    """Nested lists (H x W, or H x W x C) of numbers in 0..255 -> uint8 (H, W, C)."""
    if not isinstance(pixels, list):
        raise ImageError("pixels must be a nested list (H x W or H x W x C) of numbers")
    limit = MAX_PIXELS if expect is None else 3 * int(np.prod(expect)) + 64  # values and lists
    _check_leaves(pixels, limit)
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except OverflowError:
        raise ImageError("pixels hold a number too large; values must lie in 0..255") from None
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
    if expect is not None:
        _check_dims(arr.shape, expect)
    if budget is not None:
        budget.spend(arr.size)
    if not np.isfinite(arr).all():
        raise ImageError("pixels contain NaN or infinity; use numbers in 0..255")
    if arr.min() < 0 or arr.max() > 255:
        raise ImageError(f"pixels range {arr.min():g}..{arr.max():g}; values must lie in 0..255")
    if not np.array_equal(arr, np.round(arr)):
        raise ImageError("pixels must be whole numbers in 0..255")
    return arr.astype(np.uint8)


def check_shape(image: NDArray[np.uint8], expected: Sequence[int]) -> None:
    """Raise 400 unless ``image`` (H, W, C) has exactly the model's ``expected`` shape."""
    _check_dims(image.shape, expected)


def _check_dims(got: Sequence[int], expected: Sequence[int]) -> None:
    h, w, c = expected
    if tuple(got) != (h, w, c):
        shown = "x".join(str(d) for d in got)
        raise ImageError(
            f"the image is {shown} (HxWxC) but the model expects {h}x{w}x{c}"
            + (
                f"; convert it to {'grey' if c == 1 else 'RGB'} first"
                if tuple(got[:2]) == (h, w)
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
