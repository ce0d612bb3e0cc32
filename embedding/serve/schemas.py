"""The JSON bodies of the routes, as pydantic models (they make /openapi.json), and the
conversion of library results to them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable: bad_image, unknown_gallery, ...")
    message: str = Field(description="what is wrong, naming the field or value")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FaceEmbedding(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2] pixels of the image")
    landmarks: list[list[float]] | None = Field(description="(x, y) points, or null")
    score: float | None = Field(description="the detector's score (larger: surer)")
    embedding: list[float]


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] | list[list[FaceEmbedding]] = Field(
        description="one embedding per image; with ?faces=true one list of faces per image"
    )


class VerifyResponse(BaseModel):
    similarity: float = Field(description="cosine similarity, -1..1")
    same: bool = Field(description="similarity >= threshold")
    threshold: float
    threshold_source: str = Field(description="calibrated, given or default (uncalibrated)")


class Identity(BaseModel):
    label: str
    count: int = Field(description="vectors enrolled under the label")


class IdentitiesResponse(BaseModel):
    gallery: str
    identities: list[Identity]


class EnrolResponse(BaseModel):
    gallery: str
    label: str
    ids: list[int] = Field(description="the ids of the vectors added")


class RemoveResponse(BaseModel):
    gallery: str
    label: str
    removed: int


class Match(BaseModel):
    label: str
    similarity: float


class IdentifiedFace(BaseModel):
    box: list[float] = Field(description="[x1, y1, x2, y2]; the whole image with ?faces=false")
    matches: list[Match] = Field(description="best first, one per label")
    verdict: str = Field(description="MATCH when the best similarity >= threshold, else UNKNOWN")


class IdentifyResponse(BaseModel):
    gallery: str
    threshold: float
    threshold_source: str
    faces: list[IdentifiedFace]


class GalleriesResponse(BaseModel):
    galleries: list[str]


def face_json(face) -> dict:
    """An `embedding.faces.Face` as the JSON of `FaceEmbedding`."""
    return {
        "box": [float(v) for v in face.box],
        "landmarks": None if face.landmarks is None else face.landmarks.tolist(),
        "score": None if face.score is None else float(face.score),
        "embedding": face.embedding.tolist(),
    }
