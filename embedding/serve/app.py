"""The app, assembled in one place: the routers, the error handlers, the middleware (outer
first: metrics, API key, body limit, requests in progress), the web page, and the
lifespan that loads the model in the background and drains the batcher at shutdown."""

from __future__ import annotations

import contextlib
import pathlib

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from embedding.serve.auth import ApiKeyMiddleware
from embedding.serve.errors import install_error_handlers
from embedding.serve.limits import BodyLimitMiddleware, InFlightLimitMiddleware
from embedding.serve.metrics import MetricsMiddleware
from embedding.serve.routers import embed, galleries, health, verify
from embedding.serve.schemas import ErrorResponse
from embedding.serve.service import Service

STATIC = pathlib.Path(__file__).resolve().parent / "static"
DESCRIPTION = """ConvNeXt embeddings over HTTP: embed images, verify two photos, enrol people
into named galleries and identify faces against them.

Every error is a JSON body `{"error": {"code", "message"}}` with a 4xx status (503 with
`Retry-After` while loading or overloaded). With an API key, every `/v1` route needs
`Authorization: Bearer KEY`."""


def create_app(service: Service, on_failure=None) -> FastAPI:
    """The FastAPI app serving `service`; its model loads when the app starts
    (`on_failure(message)` if it cannot)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start(on_failure)
        try:
            yield
        finally:
            service.close()  # the server has drained the requests: finish the queue

    app = FastAPI(
        title="keras-convnext embedding service",
        description=DESCRIPTION,
        version="1",
        lifespan=lifespan,
        responses={
            401: {"model": ErrorResponse, "description": "missing or wrong API key"},
            413: {"model": ErrorResponse, "description": "body or image too large"},
            422: {"model": ErrorResponse, "description": "bad image, field or parameter"},
            503: {"model": ErrorResponse, "description": "not ready or overloaded"},
        },
    )
    app.state.service = service
    install_error_handlers(app)
    for router in (health.router, embed.router, verify.router, galleries.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    settings = service.settings
    # add_middleware wraps: the last added is the outermost
    app.add_middleware(InFlightLimitMiddleware, max_requests=settings.max_queue)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app
