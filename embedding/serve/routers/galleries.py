"""The galleries: list them, list / enrol / remove identities, identify a photo."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from embedding.serve.dependencies import ReadyService, bearer_scheme, read_uploads
from embedding.serve.schemas import (
    EnrolResponse,
    GalleriesResponse,
    IdentifyResponse,
    IdentitiesResponse,
    RemoveResponse,
)
from embedding.serve.settings import MAX_K

router = APIRouter(
    prefix="/v1/galleries", tags=["galleries"], dependencies=[Depends(bearer_scheme)]
)
Name = Annotated[str, Path(description="the gallery's name (a store holds many)")]
Label = Annotated[str, Path(description="the identity's label (a person's name or id)")]


@router.get("", response_model=GalleriesResponse, summary="The galleries of the store")
async def galleries(service: ReadyService):
    return {"galleries": await run_in_threadpool(service.gallery_names)}


@router.get(
    "/{name}/identities",
    response_model=IdentitiesResponse,
    summary="Labels and how many vectors each",
)
async def identities(name: Name, service: ReadyService):
    counts = await run_in_threadpool(service.identities, name)
    return {
        "gallery": name,
        "identities": [{"label": label, "count": count} for label, count in counts.items()],
    }


@router.post(
    "/{name}/identities/{label}",
    response_model=EnrolResponse,
    summary="Enrol photos under a label",
    description="Multipart field `images` (one or more photos). Each photo's largest face "
    "is embedded (`?faces=false`: the whole image) and all are added in one durable change "
    "(the gallery is created on first enrolment); a photo without a face refuses the lot.",
)
async def enrol(
    name: Name,
    label: Label,
    images: Annotated[list[UploadFile], File(description="photos of the person")],
    service: ReadyService,
    faces: Annotated[bool, Query(description="embed the largest face of each")] = True,
):
    uploads = await read_uploads("images", images)
    ids = await run_in_threadpool(service.enrol, name, label, uploads, faces)
    return {"gallery": name, "label": label, "ids": ids}


@router.delete(
    "/{name}/identities/{label}",
    response_model=RemoveResponse,
    summary="Remove every vector of a label",
)
async def remove(name: Name, label: Label, service: ReadyService):
    removed = await run_in_threadpool(service.forget, name, label)
    return {"gallery": name, "label": label, "removed": removed}


@router.post(
    "/{name}/identify",
    response_model=IdentifyResponse,
    summary="Who is in this photo?",
    description="Multipart field `image`. Every face (`?faces=false`: the whole image, its "
    "box the whole image) with its `k` best labels and the verdict MATCH (best similarity "
    ">= threshold: the gallery's calibrated one, else the model's) or UNKNOWN.",
)
async def identify(
    name: Name,
    image: Annotated[UploadFile, File(description="the photo")],
    service: ReadyService,
    k: Annotated[int, Query(ge=1, le=MAX_K, description="labels per face")] = 5,
    faces: Annotated[bool, Query(description="detect faces first")] = True,
):
    upload = (await read_uploads("image", [image]))[0]
    return await run_in_threadpool(service.identify, name, upload, k, faces)
