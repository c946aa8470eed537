"""The HTTP front door (FastAPI): the contract in DESIGN.md, "HTTP".

Client mistakes answer 4xx with ``{"error": "..."}`` saying what was wrong: 400 for bytes
that do not decode or a wrong shape, 413 for too large, 415 for an unsupported type,
404 for an unknown model. The body is read with a hard cap, so a huge upload costs at
most the cap.
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from numpy.typing import NDArray
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.db import make_engine, session_factory, transaction
from core.errors import ImageError
from core.images import decode_image, image_from_pixels
from core.quarantine import StoreInputError, activate_round
from gateway.config import GatewayArgs
from gateway.metrics import IngressMetrics

log = logging.getLogger(__name__)
MAX_INSTANCES = 64
IMAGE_TYPES = ("image/png", "image/jpeg")


class ModelAnswers(BaseModel):
    badnet: int
    goodnet: int


class PredictResponse(BaseModel):
    label: int | None = Field(
        description="The answer; null when the reject policy refuses a suspect input."
    )
    class_name: str | None
    suspect: bool = Field(
        description="True when BadNet and GoodNet disagree; the input was quarantined."
    )
    round: int = Field(description="The model round that answered.")
    models: ModelAnswers | None = None


class ErrorResponse(BaseModel):
    error: str


class ActivateRequest(BaseModel):
    round: int = Field(ge=0)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 503)
}

api = FastAPI(
    title="Backdoor-quarantine gateway",
    description="Serves a BadNet/GoodNet ensemble (NNoculation); quarantines inputs on which they disagree.",
    version="0.1.0",
)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(ImageError)
async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
    return error(exc.status, str(exc))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error(400, f"invalid request: {problems}")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return error(500, "internal error; the gateway logged it")


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


def image_from_json(value: Any, *, where: str = "body") -> NDArray[np.uint8]:
    """``{"image": base64}``, ``{"b64": base64}`` (KServe) or ``{"pixels": [[...]]}``."""
    if isinstance(value, list):
        return image_from_pixels(value)
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
        return decode_image(raw)
    if "pixels" in value:
        return image_from_pixels(value["pixels"])
    raise ImageError(
        f"{where} needs 'image' (base64 PNG/JPEG) or 'pixels' (nested lists of 0..255)"
    )


def parse_json(body: bytes) -> Any:
    if not body:
        raise ImageError("the body is empty; send an image or JSON")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ImageError(f"the body is not valid JSON ({exc})") from None


def image_from_request(content_type: str, body: bytes) -> NDArray[np.uint8]:
    kind = content_type.split(";")[0].strip().lower()
    if kind in IMAGE_TYPES:
        return decode_image(body)
    if kind == "application/json":
        return image_from_json(parse_json(body))
    if not kind:
        raise ImageError("set Content-Type: image/png, image/jpeg or application/json", status=415)
    raise ImageError(
        f"Content-Type {kind} is not supported; use image/png, image/jpeg or application/json",
        status=415,
    )


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, ensemble: DeploymentHandle[Any], args: GatewayArgs) -> None:
        self.ensemble = ensemble
        self.settings = args.settings()
        self.metrics = IngressMetrics()
        self._sessions: Any = None

    async def _infer(self, image: NDArray[np.uint8]) -> dict[str, Any]:
        result: dict[str, Any] = await self.ensemble.infer.remote(image)
        if "error" in result:
            raise ImageError(result["error"], status=result["status"])
        return result

    def _observe(self, route: str, start: float) -> None:
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route})

    @api.post("/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(self, request: Request) -> dict[str, Any]:
        """One image: PNG/JPEG bytes, or JSON `{"image": base64}` / `{"pixels": [[...]]}`."""
        start = time.perf_counter()
        body = await read_body(request, self.settings.max_body_bytes)
        image = image_from_request(request.headers.get("content-type", ""), body)
        result = await self._infer(image)
        self._observe("/predict", start)
        return result

    @api.post("/v1/models/{name}:predict", responses=ERRORS)
    async def kserve_predict(self, name: str, request: Request) -> dict[str, Any]:
        """KServe v1: `{"instances": [...]}` -> `{"predictions": [...]}`."""
        start = time.perf_counter()
        if name != self.settings.model_name:
            return error(
                404, f"unknown model {name!r}; this gateway serves {self.settings.model_name!r}"
            )  # type: ignore[return-value]
        body = parse_json(await read_body(request, self.settings.max_body_bytes))
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list) or not instances:
            raise ImageError("the body needs a non-empty list 'instances'")
        if len(instances) > MAX_INSTANCES:
            raise ImageError(
                f"{len(instances)} instances; at most {MAX_INSTANCES} per request", status=413
            )
        images = [
            image_from_json(item, where=f"instances[{i}]") for i, item in enumerate(instances)
        ]
        predictions = await asyncio.gather(*(self._infer(image) for image in images))
        self._observe("/v1/models:predict", start)
        return {"predictions": predictions}

    @api.get("/healthz", responses=ERRORS)
    async def healthz(self) -> Any:
        info = await self.ensemble.info.remote()
        if info["round"] is None:
            return error(503, "no model round is active yet; run 'trainer prepare' first")
        return {
            "status": "ok",
            "round": info["round"],
            "database_up": info["database_up"],
            "spool_depth": info["spool_depth"],
        }

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self.ensemble.info.remote()
        return {"models": [{"name": self.settings.model_name, **info}]}

    @api.post(
        "/admin/activate",
        responses={
            401: {"model": ErrorResponse},
            403: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
        },
    )
    async def activate(
        self, body: ActivateRequest, authorization: str | None = Header(default=None)
    ) -> Any:
        """Make round K the active round (rollback or manual activation). Bearer token."""
        expected = self.settings.admin_token
        if not expected:
            return error(403, "the admin API is disabled: set BQG_ADMIN_TOKEN to enable it")
        if not authorization or not authorization.startswith("Bearer "):
            return error(401, "send Authorization: Bearer <admin token>")
        if not hmac.compare_digest(
            authorization.removeprefix("Bearer ").encode(), expected.encode()
        ):
            return error(403, "wrong admin token")
        try:
            await asyncio.to_thread(self._activate, body.round)
        except StoreInputError as exc:
            return error(409, str(exc))
        return {"round": body.round, "activated": True}

    def _activate(self, round_no: int) -> None:
        if self._sessions is None:
            self._sessions = session_factory(make_engine(self.settings.db_url))
        with transaction(self._sessions) as session:
            activate_round(session=session, round_no=round_no, activated_by="POST /admin/activate")
