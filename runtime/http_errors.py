"""Every error the HTTP server sends, in one shape: `{"error": {"code", "message"}}`.

A client branches on the status and the code, and shows the message (facert's own, which says
what is wrong and how to fix it); it never sees a traceback. FacertError subclasses, FastAPI's
validation errors, Starlette's 404/405/413 and anything unexpected all end up here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from .errors import (
    DeadlineExceeded,
    EngineFailure,
    FacertError,
    FacertOverloaded,
    ImageError,
    InvalidArgument,
    LimitExceeded,
    ModelFileError,
)

# FacertError subclasses -> (status, code), most specific first.
FACERT_STATUS: tuple[tuple[type[FacertError], int, str], ...] = (
    (FacertOverloaded, 429, "overloaded"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (LimitExceeded, 422, "limit_exceeded"),
    (InvalidArgument, 422, "invalid_argument"),
    (ImageError, 422, "image_error"),
    (EngineFailure, 500, "engine_failure"),  # 503 once the engine thread has stopped
    (ModelFileError, 500, "model_file_error"),
    (FacertError, 500, "facert_error"),
)
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}
# The client closed the connection before its answer was ready (nginx's status for it).
CLIENT_CLOSED = 499


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error's body (the OpenAPI docs show it instead of FastAPI's default 422 shape)."""

    error: ErrorDetail


# What an API call may answer besides 200, for the OpenAPI docs.
API_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": why}
    for status, why in {
        400: "the body is not JSON, not UTF-8, or broken multipart",
        401: "missing or wrong API key",
        413: "the body is over the server's limit",
        415: "the body is not of the endpoint's media type",
        422: "a field of the wrong type, missing or unknown, or a value facert refuses",
        429: "the model's queue is full: retry after Retry-After seconds",
        503: "the server is shutting down, or the model's engine has stopped",
        504: "the X-Deadline-Ms deadline cannot be met, or ran out",
    }.items()
}


class ClientGone(Exception):
    """The client disconnected while its request ran; the request was cancelled."""


class ShuttingDown(Exception):
    """The server's shutdown grace ran out while this request ran; it was cancelled."""


SHUTDOWN_MESSAGE = "the server is shutting down and its grace period ran out before this finished"
INTERNAL_MESSAGE = "internal server error (logged by the server)"


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status, headers)


def facert_status(e: FacertError, engine_alive: bool) -> tuple[int, str]:
    """A FacertError's (status, code): 503 for an EngineFailure once the engine has stopped."""
    status, code = next((s, c) for cls, s, c in FACERT_STATUS if isinstance(e, cls))
    if isinstance(e, EngineFailure) and not engine_alive:
        status = 503
    return status, code


def _validation_message(e: RequestValidationError) -> str:
    """'body.n: Input should be a valid integer; ...' (the inputs are not echoed back)."""
    errors = e.errors()
    parts = []
    for err in errors[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        detail = err.get("ctx", {}).get("error") if err.get("type") == "json_invalid" else None
        parts.append(f"{where}: {err.get('msg', 'invalid')}" + (f" ({detail})" if detail else ""))
    more = f"; and {len(errors) - len(parts)} more" if len(errors) > len(parts) else ""
    return "; ".join(parts) + more


def install_error_handlers(
    app: FastAPI, engine_alive: Callable[[], bool], count: Callable[[str], None]
) -> None:
    """Route every exception a request can raise to one JSON error, counted by code.
    `engine_alive()` tells an engine that has stopped (503) from a failed step (500)."""

    def answer(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
        count(code)
        return error_response(status, code, message, headers)

    @app.exception_handler(FacertError)
    async def facert_error(request: Request, e: FacertError) -> JSONResponse:
        status, code = facert_status(e, engine_alive())
        headers = None
        if isinstance(e, FacertOverloaded):
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return answer(status, code, str(e), headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            return answer(400, "bad_request", f"invalid JSON: {_validation_message(e)}")
        return answer(422, "validation_error", _validation_message(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message, headers = str(e.detail), dict(e.headers or {})
        if e.status_code == 413:
            headers["Connection"] = "close"  # the rest of the body is never read
        elif e.status_code == 400 and e.__cause__ is not None:
            message += f": {e.__cause__}"  # e.g. the body is not UTF-8
        return answer(e.status_code, HTTP_CODES.get(e.status_code, f"http_{e.status_code}"),
                      message, headers)  # fmt: skip

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> JSONResponse:
        return answer(CLIENT_CLOSED, "client_closed", "the client closed the connection")

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, e: ShuttingDown) -> JSONResponse:
        return answer(503, "shutting_down", SHUTDOWN_MESSAGE, {"Connection": "close"})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        # Starlette raises the exception again after this answer, so uvicorn logs its traceback.
        return answer(500, "internal_error", INTERNAL_MESSAGE)
