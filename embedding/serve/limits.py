"""Limits that act before a route runs: the request body's size (refused with 413 before
it is read: from `Content-Length` at once, and by counting a chunked body as it streams)
and the number of `/v1` requests in progress (503 with `Retry-After` beyond it).

Both are plain ASGI middleware: a route's dependencies run only after FastAPI has read
and parsed the whole body, too late for either.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedding.serve.errors import ApiError, error_response

_CLOSE = {"Connection": "close"}  # the unread rest of the body is not waited for


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit:,} bytes (--max-upload-mb)"


class BodyLimitMiddleware:
    """413 `body_too_large` for a body over `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                response = error_response(400, "bad_request", "malformed Content-Length header")
                return await response(scope, receive, send)
            if length > self.max_bytes:
                response = error_response(413, "body_too_large", _too_large(self.max_bytes), _CLOSE)
                return await response(scope, receive, send)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI re-raises an HTTPException from here
                    raise ApiError(413, "body_too_large", _too_large(self.max_bytes), _CLOSE)
            return message

        await self.app(scope, counting_receive, send)


class InFlightLimitMiddleware:
    """503 `overloaded` (with `Retry-After`) when more than `max_requests` requests under
    `prefix` are in progress: bodies waiting for the model take memory too."""

    def __init__(self, app: ASGIApp, max_requests: int, prefix: str = "/v1/"):
        self.app = app
        self.max_requests = int(max_requests)
        self.prefix = prefix
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            message = f"{self.in_flight} requests in progress, at most {self.max_requests}"
            response = error_response(503, "overloaded", message, {"Retry-After": "1"})
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
