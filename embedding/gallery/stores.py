"""Opening gallery stores and galleries by location, and copying between them.

    from embedding.gallery import Gallery, open_store, copy_gallery
    with open_store("sqlite:///galleries.db") as store:      # or a folder, postgresql://...
        g = store.gallery("staff", create=True)
    g = Gallery.open("postgresql://app@127.0.0.1/faces#staff")  # one gallery (#NAME)
    copy_gallery(Gallery.open("staff.npz"), g)                   # ids, labels, metadata kept

The contract of stores and stored galleries, the errors and the location syntax:
`embedding.gallery.store_base`.
"""

from __future__ import annotations

import os

from embedding.gallery.folder_store import FileGallery, FolderStore
from embedding.gallery.postgres_store import PostgresStore
from embedding.gallery.sqlite_store import SQLiteStore
from embedding.gallery.store_base import (
    DEFAULT_NAME,
    GalleryConflictError,
    GalleryStore,
    StoredGallery,
    StoreError,
    parse_location,
)


def open_store(location) -> GalleryStore:
    """The store at `location`: a folder path (its galleries are NAME.npz files),
    `sqlite:///PATH` or `postgresql://...`. Nothing is created until a gallery is."""
    parsed = parse_location(location)
    if parsed.name is not None:
        raise StoreError(
            f"{parsed.text}: a store location names no gallery; drop '#{parsed.name}' "
            "(Gallery.open opens one gallery of a store)."
        )
    if parsed.kind == "path":
        return FolderStore(parsed.target)
    if parsed.kind == "sqlite":
        return SQLiteStore(parsed.target, location=parsed.text)
    return PostgresStore(parsed.target, location=parsed.text)


def open_gallery(location, *, create=False, dim=None, index=None, **params) -> StoredGallery:
    """The one gallery at `location`: a file path (FileGallery), or a store location with
    `#NAME` (default "default"). `create`, `dim`, `index`, `params`: as `GalleryStore.gallery`.
    The gallery owns the store it opened: closing it closes the store."""
    parsed = parse_location(location)
    if parsed.kind == "path":
        return FileGallery(parsed.target, create=create, dim=dim, index=index, **params)
    rest = os.fspath(location).partition("#")[0]
    store = open_store(rest)
    try:
        gallery = store.gallery(parsed.name or DEFAULT_NAME, dim, create, index, **params)
    except BaseException:
        store.close()
        raise
    gallery.owns_store = True
    return gallery


def copy_gallery(source, destination) -> int:
    """Copy every vector of `source` (any gallery) into the empty `destination` in one
    `add`, ids, labels and metadata kept, and its calibration; returns how many."""
    if len(destination):
        raise GalleryConflictError(
            f"the destination already holds {len(destination)} vectors; copy into a new "
            "or empty gallery (ids are kept, so they would collide)."
        )
    ids, vectors, labels, metadata = source.rows()
    if len(ids):
        destination.add(vectors, labels, metadata, ids=ids)
    if source.calibration is not None:
        destination.calibration = source.calibration
    return len(ids)
