"""Which files are images, what label each gets, and whether an output path can be written.

One walker serves every command (`embed`, `finetune`, ...), so a file gets the
same label everywhere:

* a folder given as ROOT is searched recursively (sorted; hidden files and
  folders, whose names start with ".", are skipped; symlinked folders are not
  followed, so a link loop cannot hang the walk); a file whose name ends in
  one of `IMAGE_EXTENSIONS` (any case) is an image;
* its label is the top-level folder under ROOT: `ROOT/alice/sub/2.jpg` is
  `alice`. A file directly in ROOT is "loose": its label is ROOT's own name
  (`embed` keeps it, `finetune` needs identity folders and leaves it out);
* a file given by name is taken whatever its extension, labelled with the name
  of the folder holding it.

Numpy only; no Keras.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass

from embedding.errors import EmptyInputError, OutputPathError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


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
    for a regular file (which may still be unreadable or not an image)."""
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


@dataclass(frozen=True)
class ImageFile:
    """An image found by `find_image_files`: its path, its label, and whether it lay
    directly in the folder that was searched (`loose`) instead of in a sub-folder."""

    path: str
    label: str
    loose: bool = False


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(path)))


def walk_folder(root) -> list[ImageFile]:
    """The images under `root`, sorted, each labelled with its top-level folder."""
    root = os.fspath(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = os.path.relpath(folder, root)
        top = None if relative == os.curdir else relative.split(os.sep)[0]
        for name in sorted(files):
            if is_image_name(name):
                path = os.path.join(folder, name)
                found.append(ImageFile(path, top or _folder_name(root), loose=top is None))
    return found


def find_image_files(paths) -> list[ImageFile]:
    """Files as given and folders searched (see the module docstring), in order.

    Raises `FileNotFoundError` naming a path that does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = []
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            found.extend(walk_folder(path))
        elif os.path.exists(path):
            found.append(ImageFile(path, _folder_name(os.path.dirname(path) or os.curdir)))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


def identity_folders(root) -> tuple[list[ImageFile], list[ImageFile]]:
    """(images in identity sub-folders of `root`, loose images directly in `root`).

    Raises `FileNotFoundError` if `root` is not a folder and `EmptyInputError`
    if no sub-folder holds an image.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    files = walk_folder(root)
    labelled = [f for f in files if not f.loose]
    if not labelled:
        raise EmptyInputError(
            f"{root}: no images in identity sub-folders (expected ROOT/<identity>/<image>, "
            f"image names ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return labelled, [f for f in files if f.loose]


def check_output_path(path, *, option: str = "output", suffixes: tuple[str, ...] = ()) -> str:
    """Refuse, before any work, an output file that could not be written.

    Checks: a suffix from `suffixes` (if given); not an existing folder; the
    nearest existing parent is a folder in which a file can be created (tried
    for real: permission bits do not bind root, read-only mounts do). Missing
    parent folders are fine (they are created when writing). Raises
    `OutputPathError` naming `option`; returns the path.
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
        raise OutputPathError(f"{option} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputPathError(f"{option} {path}: cannot write to {parent} ({reason})") from None
    return path
