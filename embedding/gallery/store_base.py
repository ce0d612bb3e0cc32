"""The contract every gallery store keeps (a folder of files, SQLite, PostgreSQL), the errors
they raise and the locations that name them.

    store = open_store(location)        # a folder, sqlite:///PATH, postgresql://...
    store.names()                       # the named galleries it holds
    g = store.gallery("staff", dim=None, create=False, index=None, **params)
    store.drop("staff"); store.close()  # or `with open_store(...) as store:`

A `StoredGallery` answers the in-memory `Gallery`'s calls (search, search_ids with `where=`,
remove, remove_label, relabel, labels, ids, counts, labels_of, metadata_of, calibration) and
differs in two ways: `add` returns the new ids, and every change is durable when the call
returns (an atomic file save, a committed transaction): one call is all of it or none. It
sees what other processes committed: before each call it checks a change counter (a file's
identity, a version number) and brings itself up to date.

Locations: a path (a folder: the store; a file: one gallery), `sqlite:///relative.db` or
`sqlite:////absolute.db` (SQLAlchemy's convention), `postgresql://user@host:port/db` or
`postgres://...` (anything libpq accepts, `?host=/socket/dir` included). A gallery in a store
location is `#NAME` at its end (default "default"). Names: `checks.check_name`.
"""

from __future__ import annotations

import os
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from embedding.errors import InputError
from embedding.gallery.checks import GalleryConflictError, check_name  # noqa: F401

DEFAULT_NAME = "default"
SCHEMES = ("sqlite", "postgresql", "postgres")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StoreError(InputError, ValueError):
    """A store location or database that cannot be used (bad scheme, not a gallery store,
    a database that refuses the connection, a foreign file)."""


class GalleryNotFoundError(InputError, LookupError):
    """A gallery name the store does not hold (a service answers 404)."""


@dataclass(frozen=True)
class Location:
    """A parsed location: `kind` "path", "sqlite" or "postgresql"; `target` the path or the
    connection string (without the fragment); `name` the gallery named by `#NAME`, if any."""

    kind: str
    target: str
    name: str | None
    text: str  # for messages: the location with any password hidden


def redact(location: str) -> str:
    """`location` with the password of a URL replaced by ***."""
    match = _URL.match(location)
    if not match:
        return location
    try:
        parts = urlsplit(location)
        if not parts.password:
            return location
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return f"{match.group(1)}://..."


def parse_location(location) -> Location:
    """A `Location`; a StoreError names what is wrong and what is accepted."""
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str) or not location:
        raise StoreError(f"a gallery location must be a non-empty str or path, got {location!r}.")
    if "\x00" in location:
        raise StoreError("a gallery location cannot contain a NUL character.")
    match = _URL.match(location)
    if not match:
        return Location("path", location, None, location)
    scheme = match.group(1).lower()
    text = redact(location)
    if scheme not in SCHEMES:
        raise StoreError(
            f"{text}: unknown store scheme {scheme!r}; use a folder or file path, "
            "sqlite:///PATH or postgresql://USER@HOST/DATABASE."
        )
    rest, _, fragment = location.partition("#")
    name = check_name(fragment, "gallery name (after #)") if fragment else None
    if scheme == "sqlite":
        parts = urlsplit(rest)
        if parts.netloc or parts.query:
            raise StoreError(
                f"{text}: a sqlite location is sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (no host, no ?options)."
            )
        path = parts.path[1:]  # sqlite:///x.db -> x.db; sqlite:////tmp/x.db -> /tmp/x.db
        if not path or path.endswith("/"):
            raise StoreError(f"{text}: no database file after sqlite:///.")
        return Location("sqlite", path, name, text)
    return Location("postgresql", rest, name, text.partition("#")[0])


class StoredGallery(ABC):
    """One named gallery in a store (see the module docstring for the contract).

    Subclasses keep `name`, `store` (None for a lone file) and `location`, and implement
    the calls below. Search-time parameters (`set_search_params`) belong to this object
    only; everything else is shared through the store.
    """

    name: str
    store: GalleryStore | None
    location: str
    owns_store = False  # opened by `open_gallery`: closing the gallery closes its store

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r} at {self.location})"

    def close(self):
        """Close the store too if this gallery opened it (`open_gallery`); a store's other
        galleries otherwise stay usable."""
        if self.owns_store and self.store is not None:
            self.store.close()

    # the calls; their meaning is the in-memory Gallery's
    @abstractmethod
    def __len__(self): ...

    @property
    @abstractmethod
    def dim(self): ...

    @property
    @abstractmethod
    def index_type(self) -> str: ...

    @property
    @abstractmethod
    def index_params(self) -> dict: ...

    @property
    @abstractmethod
    def ids(self): ...

    @property
    @abstractmethod
    def labels(self) -> list[str]: ...

    @property
    @abstractmethod
    def calibration(self): ...

    @abstractmethod
    def counts(self) -> dict[str, int]: ...

    @abstractmethod
    def labels_of(self, ids) -> list[str]: ...

    @abstractmethod
    def metadata_of(self, ids) -> list[dict]: ...

    @abstractmethod
    def rows(self):
        """(ids, unit vectors, labels, metadata) of every vector, in insertion order."""

    @abstractmethod
    def add(self, embeddings, labels, metadata=None, *, ids=None):
        """Add vectors in one transaction; returns their (N,) int64 ids."""

    @abstractmethod
    def remove(self, ids): ...

    @abstractmethod
    def remove_label(self, label) -> int: ...

    @abstractmethod
    def relabel(self, ids, labels): ...

    @abstractmethod
    def search_ids(self, queries, k: int = 5, where=None): ...

    @abstractmethod
    def search(self, queries, k: int = 5, where=None): ...

    @abstractmethod
    def set_search_params(self, **params): ...


class MemoryBackedGallery(StoredGallery):
    """A stored gallery searched in memory: an in-memory `Gallery` kept up to date with the
    store (a file, SQLite). Subclasses implement `_refresh()` (bring `self._memory` up to
    date; cheap when nothing changed) and the changes; reads are served here."""

    def __init__(self):
        self._lock = threading.RLock()  # one thread at a time changes or reads the copy
        self._memory = None

    @abstractmethod
    def _refresh(self):
        """Bring `self._memory` up to date with what the store holds."""

    def _current(self):
        self._refresh()
        return self._memory

    def __len__(self):
        with self._lock:
            return len(self._current())

    @property
    def dim(self):
        with self._lock:
            return self._current().dim

    @property
    def index_type(self) -> str:
        with self._lock:
            return self._current().index_type

    @property
    def index_params(self) -> dict:
        with self._lock:
            return self._current().index_params

    @property
    def ids(self):
        with self._lock:
            return self._current().ids

    @property
    def labels(self) -> list[str]:
        with self._lock:
            return self._current().labels

    @property
    def embeddings(self):
        with self._lock:
            return self._current().embeddings.copy()

    def counts(self) -> dict[str, int]:
        with self._lock:
            return self._current().counts()

    def labels_of(self, ids) -> list[str]:
        with self._lock:
            return self._current().labels_of(ids)

    def metadata_of(self, ids) -> list[dict]:
        with self._lock:
            return self._current().metadata_of(ids)

    def rows(self):
        with self._lock:
            return self._current().rows()

    def search_ids(self, queries, k: int = 5, where=None):
        with self._lock:
            return self._current().search_ids(queries, k, where)

    def search(self, queries, k: int = 5, where=None):
        with self._lock:
            return self._current().search(queries, k, where)

    def set_search_params(self, **params):
        with self._lock:
            self._current().set_search_params(**params)
            self._search_params = {**getattr(self, "_search_params", {}), **params}
        return self

    def refresh(self):
        """Bring this gallery up to date now (every call does it anyway)."""
        with self._lock:
            self._refresh()
        return self


class GalleryStore(ABC):
    """Named galleries in one place (see the module docstring)."""

    location: str
    default_index = "exact"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({self.location})"

    @abstractmethod
    def names(self) -> list[str]:
        """The names of the galleries it holds, sorted."""

    @abstractmethod
    def gallery(self, name, dim=None, create=False, index=None, **params) -> StoredGallery:
        """The gallery `name`; `create=True` makes it when it is not there (with `dim`, if
        given, and `index` + `params`, else the store's default index). Opening an existing
        gallery with a `dim` or an `index` (or build parameters) other than its own raises
        GalleryConflictError; search-time parameters (`ef_search`, `nprobe`) apply to the
        returned object. An unknown name without `create`: GalleryNotFoundError."""

    @abstractmethod
    def drop(self, name) -> None:
        """Delete the gallery `name` and everything in it (GalleryNotFoundError if absent)."""

    def close(self) -> None:  # noqa: B027  (a folder holds nothing to close)
        """Close the store's connection (its galleries cannot be used after this)."""

    def _not_found(self, name):
        held = self.names()
        listing = ", ".join(held[:10]) + (" ..." if len(held) > 10 else "") if held else "none"
        return GalleryNotFoundError(
            f"{self.location}: no gallery named {name!r} (it holds: {listing}); "
            "create it with create=True (enroll creates it)."
        )


def reopen_params(
    location, name, stored_index, stored_params: dict, index, params, stored_dim=None, dim=None
) -> dict:
    """The search-time parameters to apply when opening an existing gallery with `dim`,
    `index` and `params`; a GalleryConflictError when they ask for another dimension,
    another index or other build parameters than the gallery's own."""
    if dim is not None and stored_dim is not None and dim != stored_dim:
        raise GalleryConflictError(
            f"{location}: gallery {name!r} holds {stored_dim}-dim vectors, not {dim}."
        )
    if index is not None and index != stored_index:
        raise GalleryConflictError(
            f"{location}: gallery {name!r} uses index {stored_index!r}, not {index!r} "
            "(copy it into a new gallery to change the index)."
        )
    search_time = {}
    for key, value in params.items():
        if key in SEARCH_TIME:
            search_time[key] = value
        elif key not in stored_params or stored_params[key] != value:
            raise GalleryConflictError(
                f"{location}: gallery {name!r} was built with {stored_params}; "
                f"{key}={value!r} cannot change now (search-time: {', '.join(SEARCH_TIME)})."
            )
    return search_time


SEARCH_TIME = ("ef_search", "nprobe")
