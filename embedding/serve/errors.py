"""Every refusal is a JSON body `{"error": {"code", "message"}}` with a 4xx status (503
with `Retry-After` when overloaded or not ready yet); anything else reaching the handlers
is a bug: a 500 with the same shape, its traceback logged, never sent.

`ApiError(status, code, message)` is what the routes raise; `install_error_handlers`
maps the library's exceptions (bad images, unknown galleries, full queues, FastAPI's
validation errors) to the same shape, in one place.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from convnext_common.errors import InputError, error_message
from embedding.batching import BatcherClosedError, OverloadedError
from embedding.errors import FaceError, ImageLoadError, MissingExtraError, TooManyPixelsError
from embedding.gallery import (
    DimensionError,
    GalleryConflictError,
    GalleryNotFoundError,
    GalleryValueError,
    StoreError,
)

log = logging.getLogger("embedding.serve")

# status -> the code of a Starlette / FastAPI HTTPException that carries none
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """A refusal: `status`, a stable machine-readable `code`, a message naming the problem."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    """The error shape; the `X-Error-Code` header repeats the code for the metrics."""
    headers = {**(headers or {}), "X-Error-Code": code}
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _validation_message(error: RequestValidationError) -> tuple[str, str]:
    """(code, message) of FastAPI's validation error: the first problem, by field name."""
    problems = error.errors()
    if not problems:
        return "bad_request", "the request is not valid"
    first = problems[0]
    location = [str(part) for part in first.get("loc", ())]
    where, name = (location[0] if location else "request"), ".".join(location[1:]) or "body"
    if first.get("type") == "missing":
        if where == "body":
            return "missing_field", (
                f"missing multipart form field {name!r} (send multipart/form-data with the "
                f"file{'s' if name == 'images' else ''} in {name!r})"
            )
        return "missing_parameter", f"missing {where} parameter {name!r}"
    detail = first.get("msg", "invalid")
    if where == "body":
        return "bad_field", f"form field {name!r}: {detail} (send it as a file upload)"
    return "bad_parameter", f"{where} parameter {name!r}: {detail}"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to the JSON error shape."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = getattr(error, "code", None) or _HTTP_CODES.get(error.status_code, "error")
        message = error.detail if isinstance(error.detail, str) else str(error.detail)
        if code == "not_found" and not isinstance(error, ApiError):
            message = f"no route {request.method} {request.url.path}"
        if code == "method_not_allowed":
            message = f"{request.method} is not allowed on {request.url.path}"
        if message == "There was an error parsing the body":
            message = "the body could not be parsed as multipart/form-data"
        return error_response(error.status_code, code, message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        code, message = _validation_message(error)
        return error_response(422, code, message)

    @app.exception_handler(OverloadedError)
    async def overloaded(request: Request, error: OverloadedError):
        if error.retry_after <= 0:  # more than the queue could ever hold
            return error_response(413, "too_many_images", str(error))
        headers = {"Retry-After": str(int(error.retry_after))}
        return error_response(503, "overloaded", str(error), headers)

    @app.exception_handler(BatcherClosedError)
    async def shutting_down(request: Request, error: BatcherClosedError):
        return error_response(503, "shutting_down", str(error), {"Retry-After": "1"})

    @app.exception_handler(MissingExtraError)
    async def missing_extra(request: Request, error: MissingExtraError):
        return error_response(501, "faces_unavailable", error_message(error))

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        if isinstance(error, GalleryNotFoundError):
            return error_response(404, "unknown_gallery", error_message(error))
        if isinstance(error, (GalleryConflictError, DimensionError)):
            return error_response(409, "gallery_conflict", error_message(error))
        if isinstance(error, GalleryValueError):
            return error_response(422, "bad_value", error_message(error))
        if isinstance(error, StoreError):  # the database went away, refused, ...
            headers = {"Retry-After": "5"}
            return error_response(503, "store_unavailable", error_message(error), headers)
        if isinstance(error, TooManyPixelsError):
            return error_response(413, "too_many_pixels", error_message(error))
        if isinstance(error, ImageLoadError):
            return error_response(422, "bad_image", error_message(error))
        if isinstance(error, FaceError):
            return error_response(422, "no_face", error_message(error))
        return error_response(422, "bad_input", error_message(error))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal_error", "unexpected server error (logged)")
