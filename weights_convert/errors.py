"""The exceptions of `weights_convert`, one per kind of problem (all importable
without Keras). Each message names the input, what is wrong and what is accepted.

Every one is a `convnext_common.errors.InputError` (a command line reports it as one
`error:` line) and the builtin type a Python caller expects.
"""

from __future__ import annotations

from convnext_common.errors import InputError, OutputPathError


class CheckpointError(InputError, ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt, malformed header,
    overlapping tensors, non-float, NaN/Inf, a pickle."""


class CheckpointConfigError(CheckpointError):
    """A timm `config.json` (or `pretrained_cfg`) with a malformed or unusable value."""


class CheckpointMismatchError(InputError, ValueError):
    """A checkpoint that does not fit the model: missing, unexpected, mis-shaped keys."""


class UnsupportedArchitectureError(InputError, ValueError):
    """A timm architecture (or model_args) the Keras models cannot represent exactly."""


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """A source that is neither a local checkpoint nor a reachable / cached Hub id."""


class SavedModelError(InputError, ValueError):
    """A `.keras` file that is not a model this project wrote, or is damaged."""


# What a command line reports as one `error:` line (no traceback): every InputError.
USER_ERRORS = (
    CheckpointError,
    CheckpointMismatchError,
    UnsupportedArchitectureError,
    CheckpointNotFoundError,
    OutputPathError,
    SavedModelError,
)
