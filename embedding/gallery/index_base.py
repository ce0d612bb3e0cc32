"""What every vector index behind a gallery shares: the parameter checks and the calls
(`embedding.gallery.indexes` describes them and the index types)."""

from __future__ import annotations

import numpy as np


def positive_param(name, value, *, allow_none=False, low=1, high=None):
    """An int parameter in [low, high] (None where allowed), or a TypeError/ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}.")
    return value


class VectorIndex:
    """Common parameter handling; subclasses implement the storage and the search."""

    name = ""
    defaults: dict = {}
    search_time = ()  # parameters that may change after vectors were added

    def __init__(self, dim: int, **params):
        self.dim = int(dim)
        self.params = self.check_params(params, dim)

    @classmethod
    def check_params(cls, params: dict, dim: int | None = None) -> dict:
        """Defaults filled in and every value validated; unknown names are a TypeError."""
        unknown = sorted(set(params) - set(cls.defaults))
        if unknown:
            valid = ", ".join(cls.defaults) or "none"
            raise TypeError(
                f"index {cls.name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters: {valid}."
            )
        merged = {**cls.defaults, **params}
        return {key: cls._check_param(key, value, dim) for key, value in merged.items()}

    @classmethod
    def _check_param(cls, key, value, dim):
        return positive_param(key, value)

    def set_search_params(self, **params):
        fixed = sorted(set(params) - set(self.search_time))
        if fixed:
            allowed = ", ".join(self.search_time) or "none"
            raise TypeError(
                f"index {self.name!r}: {', '.join(fixed)} cannot change after building "
                f"(search-time parameters: {allowed})."
            )
        self.params.update(self.check_params({**self.params, **params}, self.dim))

    @property
    def needs_training(self) -> bool:
        return False

    def train(self, vectors):
        """Nothing to learn (IVF-PQ overrides this)."""
