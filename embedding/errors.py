"""Exceptions of the embedding package (importable without Keras).

Every failure that bad input can cause (a file, an argument, a checkpoint, a
data folder) is an `InputError` subclass (`convnext_common.errors`), which is also
the builtin type a Python caller expects (`ValueError`, `TypeError`,
`FileNotFoundError`, ...). The command lines report an `InputError` as one
`error: ...` line and exit status 2, never as a traceback
(`convnext_common.cli.run_command`); anything else is a bug, reported as one
`error: unexpected ...` line too (`--debug` shows its traceback).

To report a new kind of problem: subclass `InputError` and the builtin type
that fits, raise it with a message naming the input, what is wrong with it and
what is accepted. Nothing else needs to change.
"""

from __future__ import annotations

# the shared base and output error, re-exported: `from embedding import InputError` as before
from convnext_common.errors import InputError, OutputPathError, without_traceback  # noqa: F401


class ImageLoadError(InputError, ValueError):
    """An input could not be read as an image (one per input: `on_error="skip"` skips it).

    `index` is its position in the batch (None for a single image), `name` a
    short description of the input (its path, or its type and shape), `reason`
    what went wrong.
    """

    def __init__(self, name: str, reason: str, index: int | None = None):
        self.name = name
        self.reason = reason
        self.index = index
        where = f"input #{index} ({name})" if index is not None else f"input {name}"
        super().__init__(f"Cannot use {where} as an image: {reason}")

    def __reduce__(self):  # picklable across processes despite the custom __init__
        return type(self), (self.name, self.reason, self.index)


class TooManyPixelsError(ImageLoadError):
    """An image with more pixels than `max_pixels` (or PIL's decompression-bomb limit),
    refused from its header before it is decoded."""


class UnsupportedInputError(ImageLoadError, TypeError):
    """An input of a kind that is no image at all (None, a number, ...): also a `TypeError`."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type, e.g. `embed(None)`."""


class EmptyInputError(InputError, ValueError):
    """Nothing to work on: an empty list of images, a folder without images, ..."""


class NonFiniteError(InputError, ValueError):
    """NaN or infinity where a finite number is needed (a threshold, an embedding)."""


class ModelSourceError(InputError, ValueError):
    """A model source (checkpoint, `.keras` file, Hub id) that could not be loaded.

    `source` is what was given, `reason` what went wrong; the command line names
    its `--model` option with them.
    """

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"model {source}: {reason}")

    def __reduce__(self):
        return type(self), (self.source, self.reason)


class ModelUnavailableError(InputError, RuntimeError):
    """A Hub checkpoint could not be fetched (no network and no cached copy, ...)."""


class PairsFileError(InputError, ValueError):
    """A malformed verification pairs file, or one whose images are missing."""


class FinetuneDataError(InputError, ValueError):
    """Fine-tuning data that cannot train or evaluate (too few identities, images, pairs)."""


class FinetuneConfigError(InputError, ValueError):
    """A fine-tuning setting out of range (epochs, learning rate, holdout, ...)."""


class ResumeMismatchError(InputError, ValueError):
    """A checkpoint folder that cannot be resumed: written by a run with other settings,
    data or model, or damaged."""


FACES_EXTRA = 'pip install "keras-convnext[faces]" (opencv-python-headless>=4.8,<5, scikit-image)'


class MissingExtraError(InputError, ImportError):
    """An optional dependency of the faces package (OpenCV, scikit-image) is not installed."""


class FaceError(InputError, ValueError):
    """No usable face where one is needed (no face found, nothing to enrol, gallery mismatch)."""
