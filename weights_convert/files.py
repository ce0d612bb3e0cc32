"""How a file is written: atomically, with the permissions a plain `open(path, "w")`
would give, and no temporary file left behind that the next write does not clean up.

Every output of the project (converted models, sidecars, galleries, embeddings,
checkpoints) goes through `atomic_path` / `atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time

from weights_convert.errors import OutputPathError

TEMP_MARK = ".tmp-"  # temporary names: .<target name>.tmp-<host>-<pid>-<random><suffix>
STALE_AFTER_S = 3600.0  # another host's temporary file this old belongs to a killed write
_OWNER = re.compile(r"(?P<host>[^-]*)-(?P<pid>\d+)-")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _writer_is_gone(name_tail: str, mtime: float) -> bool:
    """Whether the writer of a temporary file (its name after TEMP_MARK) has ended:
    a dead process of this host, or (another host, an unknown name) an old file."""
    owner = _OWNER.match(name_tail)
    if owner and owner["host"] == _host():
        pid = int(owner["pid"])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return time.time() - mtime >= STALE_AFTER_S


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _suffix(path: str) -> str:
    # keep the target's extension: Keras' savers check it (.keras, .weights.h5, .npz)
    if path.endswith(".weights.h5"):
        return ".weights.h5"
    return os.path.splitext(path)[1]


def remove_stale_temporaries(path) -> int:
    """Delete the temporary files of earlier, killed writes of `path` (their process
    is gone; a concurrent writer's file is left alone); returns how many."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}{TEMP_MARK}"
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(prefix):
            continue
        candidate = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if _writer_is_gone(name[len(prefix) :], os.path.getmtime(candidate)):
                if os.path.isdir(candidate) and not os.path.islink(candidate):
                    shutil.rmtree(candidate)
                else:
                    os.remove(candidate)
                removed += 1
    return removed


def check_writable(path, *, suffixes: tuple[str, ...] | None = None, what: str = "output") -> str:
    """Refuse, before any expensive work, an output path that cannot be written: a
    wrong suffix, an existing folder, a missing or read-only parent folder.
    Returns the path as a str."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"The {what} path is empty.")
    if suffixes and not path.endswith(suffixes):
        raise OutputPathError(f"The {what} {path!r} must end in {' or '.join(suffixes)}.")
    if os.path.isdir(path):
        raise OutputPathError(f"The {what} {path!r} is a folder; give a file path.")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise OutputPathError(f"Cannot write the {what} {path!r}: {existing!r} is not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"Cannot write the {what} {path!r}: the folder {existing!r} is not writable."
        )
    if os.path.exists(path) and not os.access(path, os.W_OK) and not os.access(folder, os.W_OK):
        raise OutputPathError(f"Cannot write the {what} {path!r}: permission denied.")
    return path


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path next to `path`; move it onto `path` if the block succeeds.

    The file appears whole or not at all (fsync before the rename), with the
    permissions `open(path, "w")` would give under the current umask, and the
    temporary file is removed on any failure. Temporary files of killed writes
    are removed by the next write of the same path.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputPathError(f"The output {path!r} is a folder; give a file path.")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"Cannot create the folder of {path!r}: {error.strerror}.") from None
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}{TEMP_MARK}{_host()}-{os.getpid()}-",
            suffix=_suffix(path) if suffix is None else suffix,
            dir=folder,
        )
    except OSError as error:
        raise OutputPathError(f"Cannot write {path!r}: {error.strerror}.") from None
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:  # on disk before the rename: a crash leaves old or new
                os.fsync(f.fileno())
            # mkstemp makes 0600 files; give the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(tmp)


def atomic_write(path, write) -> str:
    """Call `write(tmp)` with a temporary path next to `path` (same extension), then
    move it onto `path` (see `atomic_path`). Returns `path`."""
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def atomic_write_text(path, text: str) -> str:
    """Write `text` to `path` atomically (UTF-8)."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, write)
