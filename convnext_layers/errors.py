"""The exceptions of `convnext_layers` (no Keras needed to import them)."""

from __future__ import annotations

from convnext_common.errors import InputError


class ConfigError(InputError, ValueError):
    """A ConvNeXt description with a field of the wrong type or value, or a timm
    argument the Keras models cannot compute exactly."""


class ModelArgumentError(InputError, ValueError):
    """An argument to a ConvNeXt model that is of the wrong type or value."""


class PresetError(InputError, ValueError):
    """A preset folder or Hub repository that is not a ConvNeXt preset, is incomplete,
    or was altered after it was written."""
