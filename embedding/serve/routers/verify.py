"""`POST /v1/verify`: two images -> their cosine similarity and the verdict."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from embedding.gallery import cosine_similarity
from embedding.serve.dependencies import ReadyService, bearer_scheme, read_uploads
from embedding.serve.errors import ApiError
from embedding.serve.schemas import VerifyResponse
from embedding.serve.service import Service, Upload

router = APIRouter(prefix="/v1", tags=["verify"], dependencies=[Depends(bearer_scheme)])


@router.post(
    "/verify",
    response_model=VerifyResponse,
    summary="Are two photos of the same identity?",
    description="Multipart files `a` and `b` -> cosine similarity of their embeddings and "
    "`same = similarity >= threshold` (the model's calibrated threshold when it has one, "
    "else the uncalibrated default). `?faces=true`: compare the largest face of each.",
)
async def verify(
    a: Annotated[UploadFile, File(description="the first image")],
    b: Annotated[UploadFile, File(description="the second image")],
    service: ReadyService,
    faces: Annotated[bool, Query(description="compare the largest face of each photo")] = False,
) -> VerifyResponse:
    first, second = (await read_uploads("a", [a]))[0], (await read_uploads("b", [b]))[0]
    if faces:
        va = await run_in_threadpool(_largest_face, service, first)
        vb = await run_in_threadpool(_largest_face, service, second)
    else:
        va, vb = await service.embed_images([first, second])
    similarity = float(cosine_similarity(va, vb))
    threshold, source = service.threshold
    return VerifyResponse(
        similarity=similarity,
        same=similarity >= threshold,
        threshold=threshold,
        threshold_source=source,
    )


def _largest_face(service: Service, upload: Upload) -> np.ndarray:
    found, _ = service.faces(upload, policy="largest")
    if not found:
        raise ApiError(422, "no_face", f"{upload.describe()}: no face found")
    return found[0].embedding
