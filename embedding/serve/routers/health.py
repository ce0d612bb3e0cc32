"""`GET /healthz` (the process lives), `GET /readyz` (the model has run), `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from embedding.serve.dependencies import ServiceDep
from embedding.serve.errors import ApiError, error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="200 while the process lives")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="200 once the model is loaded and has run, 503 before",
    responses={503: {"description": "loading (Retry-After), or the model failed"}},
)
async def readyz(service: ServiceDep):
    try:
        service.check_ready()
    except ApiError as error:
        return error_response(error.status_code, error.code, error.detail, error.headers)
    return {"status": "ready", "model": service.settings.model_name, "dim": service.dim}


@router.get("/metrics", summary="Prometheus metrics (text format)")
async def metrics(service: ServiceDep) -> Response:
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
