"""Verification pairs files (LFW's `pairs.txt` layout): parsed into image pairs, labels
and folds, every malformed line refused with its file and line number."""

from __future__ import annotations

import os

from convnext_common.errors import error_message
from convnext_common.files import file_problem
from embedding.errors import PairsFileError


def _pairs_header(tokens) -> tuple[int | None, int] | None:
    """(folds or None, pairs per class per fold) of a header line, None if it is a pair line."""
    if not tokens or len(tokens) > 2 or not all(t.isdigit() for t in tokens):
        return None
    if len(tokens) == 1:
        return None, int(tokens[0])
    return int(tokens[0]), int(tokens[1])


def read_pairs(path, root, ext="jpg"):
    """Parse an LFW pairs file: ([(img1, img2)], labels, folds or None).

    Header "FOLDS PAIRS_PER_CLASS" (e.g. "10 300": 10 folds of 300 same + 300
    different pairs) or a single count of pairs per class; then "name n1 n2"
    (same person) and "name1 n1 name2 n2" (different) lines. Images are
    ROOT/name/name_%04d.EXT. Raises `PairsFileError` naming the file and line
    for anything else, and when the header's count disagrees with the lines.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f]
    except UnicodeDecodeError:
        raise PairsFileError(f"{path}: not a text pairs file (not UTF-8)") from None
    except OSError as error:
        reason = error_message(error)
        raise PairsFileError(f"{path}: cannot read the pairs file ({reason})") from None
    numbered = [(no, tokens) for no, tokens in enumerate(lines, start=1) if tokens]
    if not numbered:
        raise PairsFileError(f"{path}: empty pairs file")
    folds = per_class = None
    header = _pairs_header(numbered[0][1])
    if header is not None:
        folds, per_class = header
        header_line, numbered = numbered[0][0], numbered[1:]

    def image(line_no, name, number):
        if name in (".", "..") or "/" in name or "\\" in name:
            raise PairsFileError(f"{path}:{line_no}: {name!r} is not a folder name under the root")
        if not number.isdigit():
            raise PairsFileError(
                f"{path}:{line_no}: {number!r} is not an image number (a whole number >= 1)"
            )
        return os.path.join(root, name, f"{name}_{int(number):04d}.{ext}")

    pairs, labels = [], []
    for line_no, tokens in numbered:
        if len(tokens) == 3:
            pairs.append((image(line_no, tokens[0], tokens[1]), image(line_no, *tokens[::2])))
            labels.append(1)
        elif len(tokens) == 4:
            pairs.append((image(line_no, *tokens[:2]), image(line_no, *tokens[2:])))
            labels.append(0)
        else:
            raise PairsFileError(
                f"{path}:{line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {' '.join(tokens)!r}"
            )
    if folds is not None and folds < 2:
        raise PairsFileError(
            f"{path}:{header_line}: the header says {folds} fold(s); k-fold accuracy needs at "
            "least 2 (header 'FOLDS PAIRS_PER_CLASS', e.g. '10 300')"
        )
    if per_class is not None:
        expected = 2 * per_class * (folds or 1)
        if len(pairs) != expected:
            shape = f"{folds} folds x " if folds else ""
            raise PairsFileError(
                f"{path}: the header promises {shape}{per_class} same + {per_class} different "
                f"pairs = {expected} lines, found {len(pairs)} (truncated or wrong header?)"
            )
    return pairs, labels, folds


def missing_images(pairs) -> list[str]:
    """The distinct image paths of `pairs` that are not files, in order."""
    missing, seen = [], set()
    for pair in pairs:
        for path in pair:
            if path not in seen:
                seen.add(path)
                if file_problem(path) is not None:
                    missing.append(path)
    return missing
