"""How a file is written, whether an output path can be written, how an input file is opened.

Writing: every output of the project (converted models, sidecars, exports, galleries,
embeddings, checkpoints, presets) goes through `atomic_path` / `atomic_write`: the
file appears whole or not at all, with the permissions a plain `open(path, "w")`
would give, and nothing is left beside it -- neither the temporary file nor any
companion file a writer made next to it under the temporary name (an exporter's
external data, say); companions the format needs are moved to the target's name.

Checking: `check_output_path` refuses, before any expensive work, an output that
could not be written. Reading: `open_regular_file` opens regular files only (a
named pipe would block forever, a device never ends), `file_problem` says why a
path is no file to read.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time

from convnext_common.errors import OutputPathError

TEMP_MARK = ".tmp-"  # temporary names: .<target name>.tmp-<host>-<pid>-<random><suffix>
STALE_AFTER_S = 3600.0  # another host's temporary file this old belongs to a killed write
_OWNER = re.compile(r"(?P<host>[^-]*)-(?P<pid>\d+)-")


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


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


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


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
                _remove(candidate)
                removed += 1
    return removed


def _companions(tmp: str) -> list[str]:
    """Files a writer made beside the temporary file under its name (`tmp` + anything,
    or its stem + another extension): what must not outlive the write."""
    folder, name = os.path.split(tmp)
    stem = name[: -len(_suffix(name))] if _suffix(name) else name
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if n != name and n.startswith(stem)]


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None, *, companions: tuple[str, ...] = ()):
    """Yield a temporary path next to `path`; move it onto `path` if the block succeeds.

    The file appears whole or not at all (fsync before the rename), with the
    permissions `open(path, "w")` would give under the current umask. Files the
    block wrote beside the temporary one under its name are companions: those whose
    extension is listed in `companions` (e.g. ".bin" for OpenVINO's weights beside
    its .xml) move to the target's name with that extension, every other one is
    removed, as is everything on failure. Temporary files of killed writes are
    removed by the next write of the same path.
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
    tmp_stem = tmp[: -len(_suffix(tmp))] if _suffix(tmp) else tmp
    target_stem = path[: -len(_suffix(path))] if _suffix(path) else path
    try:
        yield tmp
        for extension in companions:
            if os.path.lexists(tmp_stem + extension):
                os.replace(tmp_stem + extension, target_stem + extension)
        if os.path.isfile(tmp):
            with open(tmp, "rb+") as f:  # on disk before the rename: a crash leaves old or new
                os.fsync(f.fileno())
            # mkstemp makes 0600 files; give the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        for leftover in [tmp, *_companions(tmp)]:
            if os.path.lexists(leftover):
                _remove(leftover)


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


@contextlib.contextmanager
def atomic_folder(folder):
    """Yield a temporary folder path beside `folder`; on success it replaces `folder`
    (an existing one is moved aside, then removed); on failure it is removed."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(folder)
    base = os.path.basename(os.path.normpath(folder))
    tmp = tempfile.mkdtemp(prefix=f".{base}{TEMP_MARK}{_host()}-{os.getpid()}-", dir=parent)
    target = os.path.join(tmp, "content")
    try:
        yield target
        old = None
        if os.path.isdir(folder):
            old = tempfile.mkdtemp(prefix=f".{base}{TEMP_MARK}{_host()}-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(target, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Checking an output path before the work
# ----------------------------------------------------------------------------


def check_output_path(path, *, option: str = "output", suffixes: tuple[str, ...] = ()) -> str:
    """Refuse, before any work, an output file that could not be written.

    Checks: a suffix from `suffixes` (if given); not an existing folder; the
    nearest existing parent is a folder in which a file can be created (tried
    for real: permission bits do not bind root, read-only mounts do). Missing
    parent folders are fine (they are created when writing). Raises
    `OutputPathError` naming `option` (the command-line option or argument);
    returns the path as a str.
    """
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"{option}: empty output path")
    if suffixes and not path.endswith(tuple(suffixes)):
        raise OutputPathError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        raise OutputPathError(f"{option} {path}: is a folder; give a file name inside it")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputPathError(
            f"{option} {path}: {parent} is not a folder (it is a file, not a folder)"
        )
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputPathError(
            f"{option} {path}: cannot write to {parent}, the folder is not writable ({reason})"
        ) from None
    return path


# ----------------------------------------------------------------------------
# Opening an input file
# ----------------------------------------------------------------------------

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder, not a file"),
    (stat.S_ISFIFO, "a named pipe, not a regular file"),
    (stat.S_ISCHR, "a character device, not a regular file"),
    (stat.S_ISBLK, "a block device, not a regular file"),
    (stat.S_ISSOCK, "a socket, not a regular file"),
)


def _kind_problem(mode: int) -> str | None:
    return next((what for test, what in _FILE_KINDS if test(mode)), None)


def file_problem(path) -> str | None:
    """Why `path` is no file to read: "no such file", "a broken or looping symbolic
    link", "a folder, not a file", "a named pipe, not a regular file", ...; None
    for a regular file (which may still be unreadable or not what was expected)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "a broken or looping symbolic link" if os.path.islink(path) else "no such file"
    if stat.S_ISREG(mode):
        return None
    return _kind_problem(mode) or "not a regular file"


def open_regular_file(path):
    """`path` opened for binary reading if it is a regular file, else `ValueError`
    naming its kind. Reading a named pipe would wait for a writer forever and a
    device such as /dev/zero never ends: the kind is checked on the opened file
    (no window between the check and the open), which is opened without blocking."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(_kind_problem(mode) or "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
