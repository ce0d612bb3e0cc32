"""Which files are images and what label each gets: the one rule of every command.

One walker serves every command and library function that reads folders (`embed`,
`finetune`, `enroll`, `evaluate`'s images, the jobs' default labels), so a file gets
the same label everywhere:

* a folder given as ROOT is searched recursively (sorted; hidden files and
  folders, whose names start with ".", are skipped; symlinked folders are not
  followed, so a link loop cannot hang the walk); a file whose name ends in
  one of `IMAGE_EXTENSIONS` (any case) is an image;
* its label is the top-level folder under ROOT: `ROOT/alice/sub/2.jpg` is
  `alice`. A file directly in ROOT is "loose": its label is ROOT's own name
  (`embed` keeps it, `finetune` needs identity folders and leaves it out);
* a file given by name is taken whatever its extension, labelled with the name
  of the folder holding it.

Standard library only; no Keras.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from embedding.errors import EmptyInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


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


def folder_label(path) -> str:
    """The label of an image file given by name: the name of the folder holding it
    (`DIR/alice/1.jpg` is `alice`)."""
    return _folder_name(os.path.dirname(os.fspath(path)) or os.curdir)


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
            found.append(ImageFile(path, folder_label(path)))
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
