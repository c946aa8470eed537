"""Request bodies -> images, bounded: the HTTP contract in DESIGN.md, "HTTP".

Every failure is an :class:`~core.errors.ImageError` whose status the ingress answers with.
Each limit is checked before the work it bounds: the body's size while it is read, an
image's declared size against the model's input before its pixels are decoded, and every
JSON or number pathology (deep nesting, 10,000-digit integers, ``1e400``) as a 400, since
an untrusted client should never find a 500 or a stall.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request
from numpy.typing import NDArray

from core.errors import ImageError
from core.images import DecodeBudget, decode_image, image_from_pixels

MAX_INSTANCES = 64
IMAGE_TYPES = ("image/png", "image/jpeg")
Spec = Sequence[int] | None  # the active round's (H, W, C), when the ingress knows it


@dataclass(frozen=True)
class Query:
    """One image to answer, and who sent it (recorded if it is quarantined)."""

    image: NDArray[np.uint8]
    client: str | None = None


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refusing (413) as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageError(f"the body is {declared} bytes; the limit is {max_bytes}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ImageError(f"the body is over the limit of {max_bytes} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """JSON, with every parser failure a 400: bad syntax, nesting past the recursion limit,
    and integers past Python's 4,300-digit conversion limit."""
    if not body:
        raise ImageError("the body is empty; send an image or JSON")
    try:
        return json.loads(body)
    except RecursionError:
        raise ImageError("the JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ImageError(f"the body is not valid JSON ({str(exc)[:200]})") from None


def image_from_json(
    value: Any, spec: Spec, budget: DecodeBudget, *, where: str = "body"
) -> NDArray[np.uint8]:
    """``{"image": base64}``, ``{"b64": base64}`` (KServe) or ``{"pixels": [[...]]}``."""
    if isinstance(value, list):
        return image_from_pixels(value, expect=spec, budget=budget)
    if not isinstance(value, dict):
        raise ImageError(f"{where} must be an object with 'image' (base64 PNG/JPEG) or 'pixels'")
    encoded = value.get("image", value.get("b64"))
    if encoded is not None:
        if not isinstance(encoded, str):
            raise ImageError(f"{where}: 'image' must be a base64 string")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{where}: 'image' is not valid base64") from None
        return decode_image(raw, expect=spec, budget=budget)
    if "pixels" in value:
        return image_from_pixels(value["pixels"], expect=spec, budget=budget)
    raise ImageError(
        f"{where} needs 'image' (base64 PNG/JPEG) or 'pixels' (nested lists of 0..255)"
    )


def image_from_request(
    content_type: str, body: bytes, spec: Spec, max_decoded: int
) -> NDArray[np.uint8]:
    """The one image of a ``/predict`` body. Blocking: the ingress runs it off its loop."""
    budget = DecodeBudget(max_decoded)
    kind = content_type.split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        return decode_image(body, expect=spec, budget=budget)
    if kind == "application/json":
        return image_from_json(parse_json(body), spec, budget)
    if not kind:
        raise ImageError("set Content-Type: image/png, image/jpeg or application/json", status=415)
    raise ImageError(
        f"Content-Type {kind} is not supported; use image/png, image/jpeg or application/json",
        status=415,
    )


def images_from_instances(body: bytes, spec: Spec, max_decoded: int) -> list[NDArray[np.uint8]]:
    """The images of a KServe v1 ``{"instances": [...]}`` body, all within one budget."""
    value = parse_json(body)
    instances = value.get("instances") if isinstance(value, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ImageError("the body needs a non-empty list 'instances'")
    if len(instances) > MAX_INSTANCES:
        raise ImageError(
            f"{len(instances)} instances; at most {MAX_INSTANCES} per request", status=413
        )
    budget = DecodeBudget(max_decoded)
    images = []
    for i, item in enumerate(instances):
        try:
            images.append(image_from_json(item, spec, budget, where=f"instances[{i}]"))
        except ImageError as exc:
            message = str(exc)
            if not message.startswith("instances["):
                message = f"instances[{i}]: {message}"
            raise ImageError(message, status=exc.status) from None
    return images
