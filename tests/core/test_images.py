import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import ImageError
from core.images import DecodeBudget, check_shape, decode_image, encode_png, image_from_pixels


def _png(arr: np.ndarray) -> bytes:
    return encode_png(arr)


def test_png_round_trip_grey_and_rgb() -> None:
    rng = np.random.default_rng(0)
    for shape in [(28, 28, 1), (32, 32, 3)]:
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        assert np.array_equal(decode_image(_png(arr)), arr)


def test_jpeg_decodes_to_hwc() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), 100, dtype=np.uint8)).save(buf, format="JPEG")
    img = decode_image(buf.getvalue())
    assert img.shape == (20, 24, 3) and img.dtype == np.uint8


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"hello world", 400, "not a PNG or JPEG"),
        (b"GIF89a" + b"\x00" * 20, 415, "GIF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * (5 * 1024 * 1024), 413, "limit"),
    ],
)
def test_bad_bytes_get_clear_errors(data: bytes, status: int, message: str) -> None:
    with pytest.raises(ImageError, match=message) as info:
        decode_image(data)
    assert info.value.status == status


def test_truncated_png_is_400() -> None:
    data = _png(np.random.default_rng(1).integers(0, 256, size=(28, 28, 1), dtype=np.uint8))
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        decode_image(data[: len(data) // 2])
    assert info.value.status == 400


def test_real_gif_is_415() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="GIF")
    with pytest.raises(ImageError) as info:
        decode_image(buf.getvalue())
    assert info.value.status == 415


def test_pixels() -> None:
    assert image_from_pixels([[0, 255], [3, 4]]).shape == (2, 2, 1)
    assert image_from_pixels([[[1, 2, 3]]]).shape == (1, 1, 3)
    for bad, message in [
        ([[0, float("nan")]], "NaN"),
        ([[0, 256]], "0..255"),
        ([[-1, 0]], "0..255"),
        ([[0.5, 1]], "whole numbers"),
        ([[1, 2], [3]], "rectangular"),
        ([1, 2, 3], "shape"),
        ([[["a"]]], "not str"),
        ([[[1, 2]]], "shape"),
        ([["255", 0]], "not str"),
        ([[True, 0]], "not bool"),
        ([[None, 0]], "not NoneType"),
        ([[10**400]], "too large"),
        (7, "nested list"),
    ]:
        with pytest.raises(ImageError, match=message) as info:
            image_from_pixels(bad)
        assert info.value.status == 400


def test_pixels_are_bounded_before_numpy_sees_them() -> None:
    with pytest.raises(ImageError, match="more than") as info:
        image_from_pixels([[0] * 28] * 100, expect=(28, 28, 1))
    assert info.value.status == 413
    with pytest.raises(ImageError, match="expects 28x28x1"):
        image_from_pixels([[0] * 20] * 20, expect=(28, 28, 1))
    assert image_from_pixels([[[0]] * 28] * 28, expect=(28, 28, 1)).shape == (28, 28, 1)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_header_is_checked_before_any_pixel_is_decoded() -> None:
    for side in (5000, 65535):  # past our cap, and past Pillow's own bomb check
        with pytest.raises(ImageError, match="pixels") as info:
            decode_image(_png_header(side, side))
        assert info.value.status == 413
    with pytest.raises(ImageError, match="1000x1000x1 .* expects 28x28x1") as info:
        decode_image(_png_header(1000, 1000), expect=(28, 28, 1))  # no IDAT: never decoded
    assert info.value.status == 400


def test_a_budget_caps_the_decoded_bytes_of_a_request() -> None:
    budget = DecodeBudget(2000)
    png = encode_png(np.zeros((28, 28, 1), np.uint8))
    decode_image(png, budget=budget)
    decode_image(png, budget=budget)
    with pytest.raises(ImageError, match="more than 2000 bytes") as info:
        decode_image(png, budget=budget)
    assert info.value.status == 413
    with pytest.raises(ImageError, match="more than 2000 bytes"):
        image_from_pixels([[0] * 28] * 28, budget=budget)


def test_check_shape_says_what_the_model_expects() -> None:
    with pytest.raises(ImageError, match="expects 28x28x1; convert it to grey"):
        check_shape(np.zeros((28, 28, 3), dtype=np.uint8), (28, 28, 1))
    with pytest.raises(ImageError, match="32x32x1 .* expects 28x28x1"):
        check_shape(np.zeros((32, 32, 1), dtype=np.uint8), (28, 28, 1))
    check_shape(np.zeros((28, 28, 1), dtype=np.uint8), (28, 28, 1))


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=2048)
    | st.builds(lambda b: b"\x89PNG\r\n\x1a\n" + b, st.binary(max_size=512))
)
def test_arbitrary_bytes_decode_or_raise_image_error(data: bytes) -> None:
    try:
        img = decode_image(data)
    except ImageError as exc:
        assert exc.status in (400, 413, 415)
    else:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] in (1, 3)
