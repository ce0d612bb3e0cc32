"""Metadata filters: the `where=` of `search` and `search_ids`, one meaning in every store.

    where={"camera": "door"}                       # metadata["camera"] == "door"
    where={"camera": "door", "site": 3}            # and metadata["site"] == 3
    where={"camera": {"$in": ["door", "hall"]}}    # one of these

A filter is a dict of metadata keys; each key's condition is a JSON scalar (str, int, finite
float, bool or None: equality) or `{"$in": [scalars]}` (any of them). Every condition must
hold (AND). A vector whose metadata lacks the key does not match; None matches an explicit
null only. Equality is JSON's, as PostgreSQL's `jsonb` has it: 1 equals 1.0, True is not 1,
"1" is not 1, and a list or an object never equals a scalar. In memory the filter picks the
rows before the search; PostgreSQL gets it as `jsonb` containment (`metadata @> %s`), a query
parameter, never SQL text.
"""

from __future__ import annotations

import math

from embedding.gallery.checks import GalleryValueError, check_text

MAX_KEYS = 64
MAX_VALUES = 1000
SCALARS = "str, int, finite float, bool or None"


class FilterError(GalleryValueError):
    """A `where=` filter this gallery cannot evaluate (its message says what is accepted)."""


def _check_scalar(key, value):
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"where[{key!r}]: {value} is not a JSON value.")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return check_text(value, f"where[{key!r}]")
    raise FilterError(
        f"where[{key!r}] must be a {SCALARS} (equality) or {{'$in': [values]}}; "
        f"got a {type(value).__name__}."
    )


def check_where(where) -> tuple[tuple[str, tuple], ...] | None:
    """A filter as ((key, (accepted values...)), ...), or None for no filter."""
    if where is None:
        return None
    if not isinstance(where, dict):
        raise FilterError(
            f"where must be a dict of metadata conditions, got {type(where).__name__}."
        )
    if len(where) > MAX_KEYS:
        raise FilterError(f"where has {len(where)} keys; at most {MAX_KEYS}.")
    conditions = []
    for key, condition in where.items():
        if not isinstance(key, str) or not key:
            raise FilterError(f"where keys must be non-empty str, got {key!r}.")
        check_text(key, "where key")
        if isinstance(condition, dict):
            if set(condition) != {"$in"}:
                raise FilterError(
                    f"where[{key!r}]: the only operator is '$in' (a list of values); "
                    f"got {sorted(map(str, condition))}."
                )
            values = condition["$in"]
            if not isinstance(values, (list, tuple)) or not 0 < len(values) <= MAX_VALUES:
                raise FilterError(
                    f"where[{key!r}]['$in'] must be a list of 1 to {MAX_VALUES} values."
                )
            conditions.append((key, tuple(_check_scalar(key, v) for v in values)))
        else:
            conditions.append((key, (_check_scalar(key, condition),)))
    return tuple(conditions) or None


def json_key(value):
    """The dict key under which JSON-equal scalars meet: 1 and 1.0 do, True and 1 do not,
    "1" and 1 do not (jsonb's equality; a list or an object is never looked up)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    return ("null",) if value is None else ("str", value)
