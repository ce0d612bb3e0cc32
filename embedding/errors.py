"""Exceptions shared by the embedding modules (importable without Keras)."""

from embedding.preprocess import ImageLoadError


class ModelUnavailableError(RuntimeError):
    """A Hub checkpoint could not be fetched (no network and no cached copy, ...)."""


# Failures the command line reports as `error: ...` (exit status 2), without a traceback.
USER_ERRORS = (ModelUnavailableError, ImageLoadError, FileNotFoundError)
