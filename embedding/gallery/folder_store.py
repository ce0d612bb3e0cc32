"""Galleries as files: one `.npz` per gallery (the in-memory `Gallery`'s format), a folder of
them as a store.

    store = FolderStore("galleries/")          # galleries/<name>.npz, the folder made on demand
    g = store.gallery("staff", create=True)    # or FileGallery("galleries/staff.npz")

Every change rewrites the file atomically (a temporary file, fsync, rename, fsync of the
folder) under an exclusive lock on the folder (`flock`), after reloading the file if another
process replaced it: processes sharing a folder never lose each other's changes, and a
process killed mid-write leaves the old file. Readers reload when the file's identity
(inode, size, modification time) changed. Each change costs a rewrite of the whole file:
the store for galleries changed now and then (enrolment in batches); SQLite for many small
changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from embedding.gallery import Gallery
from embedding.gallery.checks import check_name
from embedding.gallery.store_base import (
    GalleryNotFoundError,
    GalleryStore,
    MemoryBackedGallery,
    StoreError,
    reopen_params,
)

SUFFIX = ".npz"


def _fsync_folder(folder: str) -> None:
    """The rename of a file in `folder` on disk (a crash after it keeps the new name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str):
    """An exclusive lock shared by every process changing files in `folder` (flock)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class FileGallery(MemoryBackedGallery):
    """One gallery file, kept in memory and rewritten atomically on every change.

    `create=True` writes an empty gallery (with `dim`, `index` and `params`) when there is
    no file; otherwise a missing file is a GalleryNotFoundError.
    """

    def __init__(self, path, *, name=None, store=None, create=False, dim=None, index=None,
                 **params):  # fmt: skip
        super().__init__()
        path = os.fspath(path)
        if os.path.isdir(path):
            raise StoreError(
                f"{path} is a folder: a store of galleries. Open one of them as "
                f"{os.path.join(path, 'NAME' + SUFFIX)} (or open_store({path!r}).gallery(NAME))."
            )
        self.path = os.path.abspath(path)
        self.folder = os.path.dirname(self.path)
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.store = store
        self.location = path
        self._signature = None
        self._search_params = {}
        if create:
            try:
                os.makedirs(self.folder, exist_ok=True)
            except OSError as error:
                raise StoreError(f"cannot create the folder of {path}: {error.strerror}.") from None
        with self._lock, self._file_lock():
            if not os.path.exists(self.path):
                if not create:
                    raise GalleryNotFoundError(
                        f"{path}: no such gallery file (create=True, or `enroll`, makes one)."
                    )
                memory = Gallery(dim, index=index or "exact", **params)
                self._save(memory)
                return
            self._refresh()
        memory = self._memory
        search_time = reopen_params(
            path, self.name, memory.index_type, memory.index_params, index, params,
            memory.dim, dim,
        )  # fmt: skip
        if search_time:
            self.set_search_params(**search_time)

    def _file_lock(self):
        if not os.path.isdir(self.folder):
            return contextlib.nullcontext()  # nothing to lock: the file cannot exist
        return folder_lock(self.folder)

    def _stat(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self):
        signature = self._stat()
        if signature is None:
            raise GalleryNotFoundError(f"{self.location}: the gallery file is gone (dropped).")
        if signature == self._signature and self._memory is not None:
            return
        memory = Gallery.load(self.path)
        if self._search_params:
            memory.set_search_params(**self._search_params)
        self._memory, self._signature = memory, signature

    def _save(self, memory):
        memory.save(self.path)
        _fsync_folder(self.folder)
        self._memory, self._signature = memory, self._stat()

    def _change(self, apply):
        """`apply(memory gallery)` under the folder lock on the current file, then the file
        rewritten; on any failure the next call reloads the file (nothing half-done stays)."""
        with self._lock, self._file_lock():
            self._refresh()
            try:
                result = apply(self._memory)
                self._save(self._memory)
            except BaseException:
                self._signature = None  # the copy in memory may be ahead of the file
                raise
            return result

    # -- changes ---------------------------------------------------------------

    # Each change is checked on the copy in memory first, so that a refused call neither
    # takes the lock nor forces a reload; `_change` then checks again on the current file.

    def add(self, embeddings, labels, metadata=None, *, ids=None):
        with self._lock:
            checked = self._current().check_add(embeddings, labels, metadata, ids)
            return self._change(lambda memory: memory.add_checked(*checked).added_ids)

    def remove(self, ids):
        with self._lock:
            self._current().labels_of(ids)  # an UnknownIdError for ids not here
            self._change(lambda memory: memory.remove(ids))
        return self

    def remove_label(self, label) -> int:
        return self._change(lambda memory: memory.remove_label(label))

    def relabel(self, ids, labels):
        self._change(lambda memory: memory.relabel(ids, labels))
        return self

    @property
    def calibration(self):
        with self._lock:
            return self._current().calibration

    @calibration.setter
    def calibration(self, calibration):
        def apply(memory):
            memory.calibration = calibration

        self._change(apply)


class FolderStore(GalleryStore):
    """A folder of gallery files: gallery NAME is FOLDER/NAME.npz (the folder is made when
    the first gallery is created)."""

    def __init__(self, folder):
        folder = os.fspath(folder)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise StoreError(
                f"{folder} is a file, not a folder of galleries: open it as one gallery "
                "(Gallery.open), or give its folder."
            )
        self.folder = folder
        self.location = folder

    def names(self) -> list[str]:
        try:
            entries = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            stem, suffix = os.path.splitext(entry)
            if suffix == SUFFIX and os.path.isfile(os.path.join(self.folder, entry)):
                with contextlib.suppress(ValueError):
                    names.append(check_name(stem))
        return sorted(names)

    def _path(self, name) -> str:
        return os.path.join(self.folder, check_name(name) + SUFFIX)

    def gallery(self, name, dim=None, create=False, index=None, **params) -> FileGallery:
        path = self._path(name)
        if not create and not os.path.isfile(path):
            raise self._not_found(name)
        return FileGallery(
            path, name=name, store=self, create=create, dim=dim, index=index, **params
        )

    def drop(self, name) -> None:
        path = self._path(name)
        if not os.path.isfile(path):
            raise self._not_found(name)
        with folder_lock(self.folder):
            try:
                os.remove(path)
            except FileNotFoundError:
                raise self._not_found(name) from None
            _fsync_folder(self.folder)
