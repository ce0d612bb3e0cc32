"""`Authorization: Bearer KEY` on every `/v1` route when the service has a key: compared in
constant time (`hmac.compare_digest`), checked before the body is read, never logged
(it travels in a header; access logs show the request line only)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from embedding.serve.errors import error_response

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="embedding"', "Connection": "close"}


class ApiKeyMiddleware:
    """401 `unauthorized` for a `/v1` request without the right bearer key."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1/"):
        if not api_key:
            raise ValueError("the API key is empty")
        self.app = app
        self._key = api_key.encode("utf-8")
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"] + "/").startswith(self.prefix):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._key):
            message = (
                "this route needs the header 'Authorization: Bearer KEY'"
                if not header
                else "the API key is not valid"
            )
            response = error_response(401, "unauthorized", message, _CHALLENGE)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
