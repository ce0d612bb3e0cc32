"""`POST /v1/embed`: images -> embeddings (whole images, or every face with `?faces=true`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from embedding.serve.dependencies import ReadyService, bearer_scheme, read_uploads
from embedding.serve.schemas import EmbedResponse, face_json

router = APIRouter(prefix="/v1", tags=["embed"], dependencies=[Depends(bearer_scheme)])


@router.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Embed images",
    description="Multipart field `images` (one or more files) -> one L2-normalised embedding "
    "per image. `?faces=true`: detect and align first; each image is then a list of faces "
    "(box, landmarks, detector score, embedding).",
)
async def embed(
    images: Annotated[list[UploadFile], File(description="one or more image files")],
    service: ReadyService,
    faces: Annotated[bool, Query(description="detect, align and embed every face")] = False,
):
    uploads = await read_uploads("images", images)
    service.check_count(uploads)
    body = {"model": service.settings.model_name, "dim": service.dim}
    if not faces:
        body["embeddings"] = (await service.embed_images(uploads)).tolist()
    else:
        per_image = []
        for upload in uploads:
            found, _ = await run_in_threadpool(service.faces, upload)
            per_image.append([face_json(face) for face in found])
        body["embeddings"] = per_image
    return JSONResponse(body)
