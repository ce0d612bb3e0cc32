"""What routes ask for with `Depends`: the service (ready, or a 503), the uploads of a
multipart field, and the bearer scheme documented in the OpenAPI description.

The API key itself is checked by `auth.ApiKeyMiddleware`, before the body is read: a
dependency runs only after FastAPI has parsed the whole multipart body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, UploadFile
from fastapi.security import HTTPBearer

from embedding.serve.service import Service, Upload

# documents `Authorization: Bearer KEY` in /openapi.json; enforced by ApiKeyMiddleware
bearer_scheme = HTTPBearer(auto_error=False, description="the key of --api-key-file")


def get_service(request: Request) -> Service:
    return request.app.state.service


def ready_service(request: Request) -> Service:
    """The service, once its model has run (503 `not_ready` with Retry-After before)."""
    service = get_service(request)
    service.check_ready()
    return service


async def read_uploads(field: str, files: list[UploadFile]) -> list[Upload]:
    """The uploaded files of form field `field`, read whole (the body limit already
    bounded their size)."""
    uploads = []
    for index, file in enumerate(files):
        uploads.append(Upload(field, index, file.filename or "", await file.read()))
    return uploads


ServiceDep = Annotated[Service, Depends(get_service)]
ReadyService = Annotated[Service, Depends(ready_service)]
