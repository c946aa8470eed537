"""The HTTP front door (FastAPI): the contract in DESIGN.md, "HTTP".

Client mistakes answer 4xx with ``{"error": "..."}`` saying what was wrong: 400 for bytes
that do not decode or a wrong shape, 413 for too large, 415 for an unsupported type,
404 for an unknown model. The body is read with a hard cap, so a huge upload costs at
most the cap.
"""

import asyncio
import hmac
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from numpy.typing import NDArray
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.db import make_engine, session_factory, transaction
from core.errors import ImageError
from core.quarantine import CLIENT_CHARS, StoreInputError, activate_round
from gateway.config import GatewayArgs
from gateway.metrics import IngressMetrics
from gateway.payloads import (
    Query,
    Spec,
    image_from_request,
    images_from_instances,
    read_body,
)

log = logging.getLogger(__name__)
MAX_ADMIN_BODY = 1024


class ModelAnswers(BaseModel):
    badnet: int
    goodnet: int | None = Field(description="null in a single-model round (codefend).")


class PredictResponse(BaseModel):
    label: int | None = Field(
        description="The answer; null when the reject policy refuses a suspect input."
    )
    class_name: str | None
    suspect: bool = Field(
        description="True when BadNet and GoodNet disagree; the input was quarantined."
    )
    round: int = Field(description="The model round that answered.")
    models: ModelAnswers | None = Field(
        default=None,
        description="Each member's label; null unless the request sends the admin token.",
    )


class ErrorResponse(BaseModel):
    error: str


class ActivateRequest(BaseModel):
    round: int = Field(ge=0, le=2**31 - 1)


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


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, ensemble: DeploymentHandle[Any], args: GatewayArgs) -> None:
        self.ensemble = ensemble
        self.settings = args.settings()
        self.metrics = IngressMetrics()
        self._sessions: Any = None
        self._spec: Spec = None
        self._spec_read = -float("inf")

    async def _input_spec(self) -> Spec:
        """The active round's (H, W, C), re-read once per poll interval, so that an image's
        header is checked before it is decoded. None while no round serves (or the read fails):
        then the generic caps bound the decode, and the ensemble answers."""
        now = time.monotonic()
        if now - self._spec_read >= self.settings.poll_seconds:
            self._spec_read = now
            try:
                info = await self.ensemble.info.remote()
                spec = info.get("input")
                self._spec = (
                    None if spec is None else (spec["height"], spec["width"], spec["channels"])
                )
            except Exception:  # a failed read keeps the last spec
                log.warning("could not read the active round's input spec", exc_info=True)
        return self._spec

    def _client(self, request: Request) -> str:
        """Who sent ``request``: the configured client header, else the peer address."""
        header = self.settings.client_header
        named = request.headers.get(header, "").strip() if header else ""
        if named:
            return "".join(ch for ch in named if ch.isprintable())[:CLIENT_CHARS]
        return request.client.host if request.client else "unknown"

    async def _infer(self, image: NDArray[np.uint8], members: bool, client: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.ensemble.infer.remote(Query(image, client))
        if "error" in result:
            raise ImageError(result["error"], status=result["status"])
        if not members:
            result["models"] = None
        return result

    def _observe(self, route: str, start: float) -> None:
        self.metrics.latency.observe(time.perf_counter() - start, tags={"route": route})

    def _admin_error(self, authorization: str | None) -> JSONResponse | None:
        """None when ``authorization`` carries the admin token, else the answer to give."""
        expected = self.settings.admin_token
        if not expected:
            return error(403, "the admin API is disabled: set BQG_ADMIN_TOKEN to enable it")
        if not authorization or not authorization.startswith("Bearer "):
            return error(401, "send Authorization: Bearer <admin token>")
        if not hmac.compare_digest(
            authorization.removeprefix("Bearer ").encode(), expected.encode()
        ):
            return error(403, "wrong admin token")
        return None

    def _members_visible(self, request: Request) -> bool:
        """Each member's label is for operators: the admin token, or the debug setting."""
        return self.settings.expose_members or (
            self.settings.admin_token is not None
            and self._admin_error(request.headers.get("authorization")) is None
        )

    @api.post("/predict", response_model=PredictResponse, responses=ERRORS)
    async def predict(self, request: Request) -> dict[str, Any]:
        """One image: PNG/JPEG bytes, or JSON `{"image": base64}` / `{"pixels": [[...]]}`."""
        start = time.perf_counter()
        body = await read_body(request, self.settings.max_body_bytes)
        image = await asyncio.to_thread(
            image_from_request,
            request.headers.get("content-type", ""),
            body,
            await self._input_spec(),
            self.settings.max_decoded_bytes,
        )
        result = await self._infer(image, self._members_visible(request), self._client(request))
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
        body = await read_body(request, self.settings.max_body_bytes)
        images = await asyncio.to_thread(
            images_from_instances, body, await self._input_spec(), self.settings.max_decoded_bytes
        )
        members, client = self._members_visible(request), self._client(request)
        predictions = await asyncio.gather(
            *(self._infer(image, members, client) for image in images)
        )
        self._observe("/v1/models:predict", start)
        return {"predictions": predictions}

    @api.get("/healthz", responses=ERRORS)
    async def healthz(self) -> Any:
        info = await self.ensemble.info.remote()
        if info["round"] is None:
            return error(503, "no model round is active yet; run 'trainer prepare' first")
        return {
            "status": "ok" if info["fallback"] is None else "degraded",
            "round": info["round"],
            "database_up": info["database_up"],
            "spool_depth": info["spool_depth"],
            "quarantine_dropped": info["quarantine_dropped"],
            "fallback": info["fallback"],
        }

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        info = await self.ensemble.info.remote()
        return {"models": [{"name": self.settings.model_name, **info}]}

    @api.post(
        "/admin/activate",
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            403: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ActivateRequest.model_json_schema()}},
            }
        },
    )
    async def activate(self, request: Request) -> Any:
        """Make round K the active round (rollback or manual activation). Bearer token.

        The token is checked before the body is read, and the body is capped at 1 KB: an
        unauthenticated client costs no parsing."""
        refused = self._admin_error(request.headers.get("authorization"))
        if refused is not None:
            return refused
        raw = await read_body(request, MAX_ADMIN_BODY)
        try:
            body = ActivateRequest.model_validate_json(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
            )
            return error(400, f'invalid request: {problems}; send {{"round": K}}')
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
