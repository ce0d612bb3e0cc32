"""The one place values are made JSON-safe (configs, sidecars, run states, metadata)."""

from __future__ import annotations

import json
import math

import numpy as np

UNKNOWN_POLICIES = ("drop", "str", "raise")


def jsonable(value, *, unknown: str = "drop"):
    """`value` as plain JSON data: dict keys as str, tuples as lists, numpy scalars and
    arrays as Python numbers and lists, non-finite floats as None.

    `unknown` says what becomes of anything else (a dtype, a callable, an object):
    "drop" leaves it out of its dict or list, "str" writes its `str()`, "raise" raises
    `TypeError`. A value that is itself unknown becomes None under "drop".
    """
    if unknown not in UNKNOWN_POLICIES:
        raise ValueError(f"unknown must be one of {UNKNOWN_POLICIES}, got {unknown!r}.")
    made = _convert(value, unknown)
    return None if made is _DROPPED else made


_DROPPED = object()


def _convert(value, unknown):
    if isinstance(value, dict):
        out = {str(k): _convert(v, unknown) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _DROPPED}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        return [v for v in (_convert(v, unknown) for v in items) if v is not _DROPPED]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if unknown == "str":
        return str(value)
    if unknown == "raise":
        raise TypeError(f"{type(value).__name__} {value!r} is not JSON data.")
    return _DROPPED


def dumps(value, **options) -> str:
    """`json.dumps` of `jsonable(value)` (keyword `unknown` as there; other options are
    json.dumps's)."""
    unknown = options.pop("unknown", "drop")
    return json.dumps(jsonable(value, unknown=unknown), **options)
