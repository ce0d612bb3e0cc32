"""Enrolment and identification: people's photos -> a gallery; a photo's faces -> their
best matches and a verdict."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from embedding.errors import EmptyInputError, FaceError, ImageLoadError
from embedding.faces.detectors import DEFAULT_MIN_SIZE, find_faces
from embedding.faces.geometry import DEFAULT_MARGIN
from embedding.faces.pipeline import Face, embed_crops, embed_faces, face_image
from embedding.files import identity_folders
from embedding.gallery import Gallery
from embedding.images import describe_input, load_image
from embedding.metrics import DEFAULT_THRESHOLD

# ----------------------------------------------------------------------------
# Enrol and identify
# ----------------------------------------------------------------------------


@dataclass
class Enrollment:
    """Outcome of `enroll`: the gallery (one row per enrolled photo), which photo each row
    came from (`sources[i]` is row i's), and the skipped photos as (photo, reason)."""

    gallery: Gallery
    sources: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Enrolled photos per label, in gallery order."""
        counts: dict[str, int] = {}
        for label in self.gallery.labels:
            counts[label] = counts.get(label, 0) + 1
        return counts


def enroll(
    embedder,
    people: Mapping[str, Sequence],
    *,
    detector: Callable | None = None,
    align: bool = True,
    margin: float = DEFAULT_MARGIN,
    flip: bool = False,
    min_size: float = DEFAULT_MIN_SIZE,
) -> Enrollment:
    """A `Gallery` of the largest face of every photo: `people` maps a label to its photos.

    Photos that cannot be read or hold no face (after `min_size`) are skipped and listed in
    `Enrollment.skipped`; `FaceError` when no photo at all gives a face.
    """
    output_size = embedder.preprocessor.config.input_size
    crops, labels, sources, skipped = [], [], [], []
    total = sum(len(photos) for photos in people.values())
    with tqdm(total=total, disable=not embedder.progress, unit="photo", desc="detect") as bar:
        for label, photos in people.items():
            for photo in photos:
                bar.update()
                name = describe_input(photo)
                try:
                    picture = load_image(photo, channel_order=embedder.channel_order)
                except ImageLoadError as error:
                    skipped.append((name, error.reason))
                    continue
                found = find_faces(picture, detector, "largest", min_size)
                if not found:
                    skipped.append((name, "no face found"))
                    continue
                crops.append(face_image(picture, found[0], output_size, align, margin)[0])
                labels.append(str(label))
                sources.append(name)
    if not crops:
        raise FaceError(f"no face found in any of the {total} photo(s); nothing to enrol.")
    gallery = Gallery().add(embed_crops(embedder, crops, flip), labels)
    return Enrollment(gallery, sources, skipped)


def people_folders(people_dir) -> tuple[dict[str, list[str]], list[str]]:
    """PEOPLE_DIR/<label>/**/<image> -> ({label: [paths]}, loose images outside any folder).

    Labels and images are what `embedding.files.identity_folders` finds, the one rule of
    every command (`embed`, `finetune`, `enroll`): sorted, recursive, hidden files and
    folders skipped. Raises `FileNotFoundError` for a missing folder and `FaceError` when
    no person folder holds an image.
    """
    try:
        labelled, loose = identity_folders(people_dir)
    except EmptyInputError:
        raise FaceError(
            f"{people_dir}: no person folders with images "
            "(expected PEOPLE_DIR/<name>/<photo>.jpg, one folder per person)."
        ) from None
    people: dict[str, list[str]] = {}
    for image in labelled:
        people.setdefault(image.label, []).append(image.path)
    return people, [image.path for image in loose]


def enroll_folder(embedder, people_dir, **options) -> Enrollment:
    """`enroll` the people of a folder: one sub-folder per person, named by its label, with one
    or more photos each (see `people_folders`). Images lying directly in `people_dir` belong to
    nobody: they are reported as skipped. `options` are `enroll`'s."""
    people, loose = people_folders(people_dir)
    result = enroll(embedder, people, **options)
    result.skipped[:0] = [(path, "not inside a person folder") for path in loose]
    return result


@dataclass(frozen=True, eq=False)
class Identification:
    """A face of the query image, its best gallery match (label, cosine similarity) and the
    verdict `matched = score >= threshold`."""

    face: Face
    label: str
    score: float
    threshold: float
    matched: bool


def identify(
    embedder,
    image,
    gallery: Gallery,
    *,
    threshold: float | None = None,
    detector: Callable | None = None,
    policy: str = "all",
    **options,
) -> list[Identification]:
    """Every face of `image` (policy "all" by default) with its best match in `gallery`.

    `threshold`: accept when the cosine similarity >= it; None uses the embedder's
    (`Embedder.calibrate`) or else `embedding.metrics.DEFAULT_THRESHOLD` (uncalibrated).
    `options` are `embed_faces`'s (align, margin, flip, min_size, channel_order, ...).
    """
    if len(gallery) == 0:
        raise FaceError("the gallery is empty; enrol people first.")
    if gallery.dim != embedder.dim:
        raise FaceError(
            f"the gallery holds {gallery.dim}-dim embeddings but the model gives "
            f"{embedder.dim}-dim ones; identify with the model the gallery was enrolled with."
        )
    if threshold is None:
        threshold = embedder.threshold if embedder.threshold is not None else DEFAULT_THRESHOLD
    faces = embed_faces(embedder, image, detector, policy=policy, **options)
    if not faces:
        return []
    labels, scores = gallery.search(np.stack([f.embedding for f in faces]), k=1)
    return [
        Identification(face, str(label), float(score), float(threshold), bool(score >= threshold))
        for face, label, score in zip(faces, labels[:, 0], scores[:, 0], strict=True)
    ]
