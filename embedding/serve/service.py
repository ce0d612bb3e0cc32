"""The service behind the routes: the model (loaded and warmed up in a background thread,
so `/healthz` answers at once and `/readyz` only once the model has run), its dynamic
batcher, the face detector and the gallery store. The routes translate HTTP to these
calls and back; everything here is plain Python, testable without a server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from convnext_common.errors import error_message
from embedding.batching import BatchedEmbedder, DynamicBatcher, check_finite_rows
from embedding.errors import ImageLoadError, TooManyPixelsError
from embedding.faces import HaarCascadeDetector, PerThreadDetector, embed_faces
from embedding.gallery import GalleryNotFoundError
from embedding.gallery.checks import MAX_LABEL_CHARS, check_name
from embedding.metrics import DEFAULT_THRESHOLD
from embedding.serve.errors import ApiError
from embedding.serve.metrics import Metrics
from embedding.serve.settings import ServeSettings

log = logging.getLogger("embedding.serve")
MAX_SEARCH_DEPTH = 4096  # most neighbours searched to find k distinct labels


def printable(text: str) -> str:
    """`text` without control characters (a file name kept as metadata)."""
    return "".join(c for c in text if c.isprintable())[:MAX_LABEL_CHARS]


def check_label(label: str) -> str:
    """A label to enrol under: printable text, not blank (422 `bad_label` otherwise)."""
    if not label.strip() or not label.isprintable() or len(label) > MAX_LABEL_CHARS:
        raise ApiError(
            422, "bad_label",
            f"label {label[:40]!r}: a label is 1..{MAX_LABEL_CHARS} printable characters, "
            "not only spaces",
        )  # fmt: skip
    return label


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the form field, its place in the field, its name, its bytes."""

    field: str
    index: int
    filename: str
    data: bytes

    def describe(self) -> str:
        name = f" ({self.filename!r})" if self.filename else ""
        return f"{self.field}[{self.index}]{name}"


def image_refusal(upload: Upload, error: ImageLoadError) -> ApiError:
    """The 4xx for an upload that is no usable image (413 for too many pixels)."""
    if isinstance(error, TooManyPixelsError):
        return ApiError(413, "too_many_pixels", f"{upload.describe()}: {error.reason}")
    return ApiError(422, "bad_image", f"{upload.describe()}: {error.reason}")


class Service:
    """Args:
    settings: `ServeSettings`.
    load_embedder: () -> an `Embedder` or `OnnxEmbedder` with `batch_size` = max_batch
        (called in the loading thread: Keras may load there).
    store: a gallery store (`open_store(location)`), or None for none.
    detector_factory: () -> a face detector (one per thread), or None: OpenCV's Haar
        cascade (`embedding.faces.default_detector`'s kind).
    """

    def __init__(
        self,
        settings: ServeSettings,
        load_embedder: Callable,
        store=None,
        detector_factory: Callable | None = None,
    ):
        self.settings = settings
        self.load_embedder = load_embedder
        self.store = store
        self.detector = PerThreadDetector(detector_factory or HaarCascadeDetector)
        self.embedder = None
        self.batcher: DynamicBatcher | None = None
        self.batched: BatchedEmbedder | None = None
        self.ready = False
        self.failure: str | None = None  # why the model could not be loaded
        self.metrics = Metrics(settings.max_batch, lambda: self.queue_depth)
        self._locks: dict[str, threading.Lock] = {}
        self._galleries: dict = {}  # name -> the store's gallery object, opened once
        self._locks_lock = threading.Lock()

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth if self.batcher is not None else 0

    # -- life cycle -------------------------------------------------------------

    def start(self, on_failure: Callable[[str], None] | None = None) -> threading.Thread:
        """Load and warm up the model in a background thread; `on_failure(message)` if that
        fails (the command line then stops the server)."""
        thread = threading.Thread(
            target=self._load, args=(on_failure,), name="load-model", daemon=True
        )
        thread.start()
        return thread

    def _load(self, on_failure) -> None:
        try:
            start = time.perf_counter()
            embedder = self.load_embedder()
            sizes = embedder.warm_up()  # compile every batch shape now, not on a request
            self.embedder = embedder
            self.batcher = DynamicBatcher(
                embedder.embed_arrays,
                max_batch=self.settings.max_batch,
                timeout_s=self.settings.batch_timeout_ms / 1000.0,
                max_queue=self.settings.max_queue,
                on_batch=self.metrics.observe_batch,
                name="model-batcher",
            )
            self.batched = BatchedEmbedder(embedder, self.batcher)
            self.batched.embed([np.zeros((32, 32, 3), np.uint8)])  # the whole request path once
            log.info(
                "model %s ready (dim %d, batch sizes %s) in %.1f s",
                self.settings.model_name, embedder.dim, sizes, time.perf_counter() - start,
            )  # fmt: skip
            self.ready = True
        except Exception as error:  # reported, and the command line exits with it
            self.failure = error_message(error)
            log.error("the model could not be loaded: %s", self.failure)
            if on_failure is not None:
                on_failure(self.failure)

    def close(self) -> None:
        """Finish what is queued and stop the batcher (after the server drained)."""
        if self.batcher is not None:
            self.batcher.close()

    def check_ready(self) -> None:
        if self.failure is not None:
            raise ApiError(503, "model_failed", f"the model could not be loaded: {self.failure}")
        if not self.ready:
            raise ApiError(
                503, "not_ready", "the model is loading; try again shortly", {"Retry-After": "1"}
            )

    # -- embedding --------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def threshold(self) -> tuple[float, str]:
        """(verification threshold, "calibrated" | "given" | "default")."""
        if self.embedder.threshold is not None:
            return float(self.embedder.threshold), self.embedder.threshold_source
        return DEFAULT_THRESHOLD, "default"

    def check_count(self, uploads: list[Upload]) -> None:
        """413 `too_many_images` for more images than the queue could ever hold, before
        any is decoded."""
        if len(uploads) > self.settings.max_queue:
            raise ApiError(
                413, "too_many_images",
                f"{len(uploads)} images in one request; at most {self.settings.max_queue} "
                "(--max-queue): send them in several requests",
            )  # fmt: skip

    async def embed_images(self, uploads: list[Upload]) -> np.ndarray:
        """(N, D) embeddings of whole images, batched with whatever else is waiting for
        the model (the batcher's worker decodes them just before their batch runs); the
        first unusable upload is refused (4xx) and nothing is returned."""
        self.check_count(uploads)
        futures = self.batched.submit([upload.data for upload in uploads])
        rows = await asyncio.gather(
            *(asyncio.wrap_future(future) for future in futures), return_exceptions=True
        )
        for upload, row in zip(uploads, rows, strict=True):
            if isinstance(row, ImageLoadError):
                raise image_refusal(upload, row)
            if isinstance(row, BaseException):
                raise row
        return check_finite_rows(np.stack(rows), [u.describe() for u in uploads])

    def load_picture(self, upload: Upload):
        """The upload as an RGB image (the pixel limit checked before decoding)."""
        try:
            return self.embedder.preprocessor.load(upload.data)
        except ImageLoadError as error:
            raise image_refusal(upload, error) from None

    def faces(self, upload: Upload, policy: str = "all") -> tuple[list, tuple[int, int]]:
        """(faces of the image, (width, height)): detected, aligned and embedded, the
        crops batched like any image (blocks: run it in a worker thread)."""
        picture = self.load_picture(upload)
        size = _image_size(picture)
        options = dict(self.settings.face_options)
        found = embed_faces(self.batched, picture, self.detector, policy=policy, **options)
        return found, size

    def whole_image(self, upload: Upload) -> tuple[np.ndarray, tuple[int, int]]:
        """(embedding of the whole image, (width, height)) (blocks)."""
        picture = self.load_picture(upload)
        return self.batched.embed([picture])[0], _image_size(picture)

    # -- galleries --------------------------------------------------------------

    def lock(self, name: str) -> threading.Lock:
        """The lock that serialises changes to gallery `name` in this process (a folder
        store rewrites the gallery's file on each change)."""
        with self._locks_lock:
            return self._locks.setdefault(name, threading.Lock())

    def gallery_names(self) -> list[str]:
        return [] if self.store is None else list(self.store.names())

    def gallery(self, name: str, create: bool = False):
        """The stored gallery `name` (`create`: made on first use, for this model's
        dimension); 404 `unknown_gallery` when there is none, 409 when it holds vectors of
        another dimension."""
        if self.store is None:
            raise ApiError(
                404, "unknown_gallery",
                f"no gallery {name!r}: this server has no gallery store (start it with "
                "--gallery STORE)",
            )  # fmt: skip
        with self._locks_lock:
            gallery = self._galleries.get(name)
        if gallery is None:
            try:
                gallery = self.store.gallery(name, dim=self.dim if create else None, create=create)
            except GalleryNotFoundError as error:
                raise ApiError(404, "unknown_gallery", error_message(error)) from None
            with self._locks_lock:
                gallery = self._galleries.setdefault(name, gallery)
        if gallery.dim is not None and gallery.dim != self.dim:
            raise ApiError(
                409, "dimension_mismatch",
                f"gallery {name!r} holds {gallery.dim}-dimensional embeddings; this model "
                f"makes {self.dim}-dimensional ones (enrol it again with this model)",
            )  # fmt: skip
        return gallery

    def identities(self, name: str) -> dict[str, int]:
        return dict(self.gallery(name).counts())

    def enrol(self, name: str, label: str, uploads: list[Upload], faces: bool) -> list[int]:
        """Embed each photo (its largest face, or the whole image) and add them all under
        `label` in one durable change; nothing is added if any photo fails (blocks)."""
        check_name(name)  # refused before any work
        check_label(label)
        self.check_count(uploads)
        vectors, metadata = [], []
        if faces:
            for upload in uploads:
                found, _ = self.faces(upload, policy="largest")
                if not found:
                    raise ApiError(422, "no_face", f"{upload.describe()}: {self._no_face()}")
                vectors.append(found[0].embedding)
                box = [float(v) for v in found[0].box]
                metadata.append({"source": printable(upload.filename), "box": box})
        else:
            pictures = [self.load_picture(upload) for upload in uploads]
            vectors.extend(self.batched.embed(pictures))
            metadata.extend({"source": printable(upload.filename)} for upload in uploads)
        with self.lock(name):
            gallery = self.gallery(name, create=True)
            ids = gallery.add(np.stack(vectors), [label] * len(vectors), metadata)
        return [int(i) for i in ids]

    def forget(self, name: str, label: str) -> int:
        """Remove every vector of `label`; 404 `unknown_label` when it has none."""
        with self.lock(name):
            gallery = self.gallery(name)
            removed = int(gallery.remove_label(label)) if label in gallery.counts() else 0
        if not removed:
            raise ApiError(404, "unknown_label", f"gallery {name!r} has no identity {label!r}")
        return removed

    def identify(self, name: str, upload: Upload, k: int, faces: bool) -> dict:
        """Each face of the photo (or the whole photo) with its k best labels and the
        verdict against the gallery's calibrated threshold, else the model's (blocks)."""
        gallery = self.gallery(name)  # 404 before any work
        if faces:
            found, _ = self.faces(upload)
            entries = [(face.box, face.embedding) for face in found]
        else:
            vector, (width, height) = self.whole_image(upload)
            entries = [((0.0, 0.0, float(width), float(height)), vector)]
        threshold, source = self.threshold
        calibration = gallery.calibration
        if calibration is not None:
            threshold, source = float(calibration.threshold), "calibrated"
        matches = self._matches(gallery, [vector for _, vector in entries], k)
        return {
            "gallery": name,
            "threshold": threshold,
            "threshold_source": source,
            "faces": [
                {
                    "box": [float(v) for v in box],
                    "matches": best,
                    "verdict": "MATCH"
                    if best and best[0]["similarity"] >= threshold
                    else "UNKNOWN",
                }
                for (box, _), best in zip(entries, matches, strict=True)
            ],
        }

    @staticmethod
    def _matches(gallery, vectors, k: int) -> list[list[dict]]:
        """Per vector, up to k distinct labels with their best similarity, best first."""
        counts = gallery.counts()
        if not vectors or not counts:
            return [[] for _ in vectors]
        # enough neighbours for k labels even when one label holds many vectors
        depth = min(sum(counts.values()), max(k, k * max(counts.values())), MAX_SEARCH_DEPTH)
        try:
            labels, scores = gallery.search(np.stack(vectors), k=depth)
        except ValueError:
            if len(gallery) == 0:  # emptied by a removal since the counts were read
                return [[] for _ in vectors]
            raise
        found = []
        for row_labels, row_scores in zip(labels, scores, strict=True):
            best: dict[str, float] = {}
            for label, score in zip(row_labels, row_scores, strict=True):
                if label != "" and np.isfinite(score) and label not in best:
                    best[str(label)] = float(score)
            ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
            found.append([{"label": label, "similarity": score} for label, score in ranked])
        return found

    def _no_face(self) -> str:
        size = self.settings.face_options.get("min_size")
        return f"no face found (faces smaller than {size:g} px are ignored)"


def _image_size(picture) -> tuple[int, int]:
    if isinstance(picture, Image.Image):
        return picture.width, picture.height
    return int(picture.shape[1]), int(picture.shape[0])
