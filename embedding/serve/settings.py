"""The service's settings: what `python -m embedding serve` options set."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedding.faces import DEFAULT_MARGIN, DEFAULT_MIN_SIZE

MAX_K = 100  # most matches `identify` returns per face


@dataclass(frozen=True)
class ServeSettings:
    """model_name: how responses name the model. max_batch, batch_timeout_ms: dynamic
    batching (max_batch 1: off). max_queue: images waiting for the model (and requests in
    progress) before 503. max_upload_bytes: the largest request body. api_key: needed by
    every /v1 route when set. face_options: `embed_faces`'s align, margin, flip, min_size.
    """

    model_name: str = "model"
    max_batch: int = 32
    batch_timeout_ms: float = 5.0
    max_queue: int = 256
    max_upload_bytes: int = 20 * 2**20
    api_key: str | None = field(default=None, repr=False)  # never printed
    face_options: dict = field(
        default_factory=lambda: {"align": True, "margin": DEFAULT_MARGIN, "flip": False,
                                 "min_size": DEFAULT_MIN_SIZE}
    )  # fmt: skip
