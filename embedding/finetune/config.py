"""`FinetuneConfig`: every setting that changes a fine-tuning run (and so its resume key)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from convnext_layers import POOLINGS
from embedding.errors import FinetuneConfigError

# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

HOLDOUT_BY = ("identity", "image")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting that changes a fine-tuning run (and so its resume key).

    Attributes:
        epochs: total epochs, warm-up epochs included.
        batch_size: global batch size (split over devices and processes).
        learning_rate, weight_decay: AdamW; the rate follows a cosine schedule
            (after `warmup_steps` linear warm-up, default 5% of the steps) from
            the first unfrozen epoch to the end.
        freeze_epochs: epochs at the start that train only the ArcFace centres
            (and the projection), at a constant `learning_rate`.
        holdout, holdout_by: share held out for verification, by "identity"
            (open-set, default) or "image" (a share of every identity); 0: none.
        embedding_dim: add a Dense projection to this size before the L2 norm.
        scale, margin, easy_margin: the `ArcFace` settings (s=30, m=0.35).
        augment, hflip: random translations (1/16 of the side) and flips.
        image_size: input side for checkpoint sources (default: the
            checkpoint's own); folder images are resized to the model input.
        pooling, head_norm: passed to `build_model` for checkpoint sources.
        max_pairs: cap on the held-out pairs scored (all pairs below it).
        seed: split, shuffling, augmentation and initialisation.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    freeze_epochs: int = 0
    holdout: float = 0.2
    holdout_by: str = "identity"
    embedding_dim: int | None = None
    scale: float = 30.0
    margin: float = 0.35
    easy_margin: bool = False
    augment: bool = True
    hflip: bool = True
    image_size: int | None = None
    pooling: str = "avg"
    head_norm: bool = True
    max_pairs: int = 200_000
    seed: int = 0

    def __post_init__(self):
        def whole(name, low, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise FinetuneConfigError(f"{name} must be a whole number, got {value!r}.")
            if value < low:
                raise FinetuneConfigError(f"{name} must be at least {low}, got {value}.")

        def number(name, low, high=math.inf, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise FinetuneConfigError(f"{name} must be a number, got {value!r}.")
            value = float(value)
            if (
                not math.isfinite(value)
                or value < low
                or value >= high
                or (low_open and value == low)
            ):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g})"
                raise FinetuneConfigError(f"{name} must lie in {interval}, got {value!r}.")

        whole("epochs", 1)
        whole("batch_size", 1)
        whole("freeze_epochs", 0)
        whole("warmup_steps", 0, optional=True)
        whole("embedding_dim", 1, optional=True)
        whole("image_size", 16, optional=True)
        whole("max_pairs", 2)
        whole("seed", 0)
        if self.freeze_epochs > self.epochs:
            raise FinetuneConfigError(
                f"freeze_epochs ({self.freeze_epochs}) cannot exceed epochs ({self.epochs})."
            )
        number("learning_rate", 0.0, low_open=True)
        number("weight_decay", 0.0)
        number("holdout", 0.0, 1.0)
        number("scale", 0.0, low_open=True)
        number("margin", 0.0, math.pi / 2)
        if self.holdout_by not in HOLDOUT_BY:
            raise FinetuneConfigError(
                f"holdout_by must be 'identity' or 'image', got {self.holdout_by!r}."
            )
        if self.pooling not in POOLINGS:
            raise FinetuneConfigError(
                f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}."
            )
        for name in ("easy_margin", "augment", "hflip", "head_norm"):
            if not isinstance(getattr(self, name), bool):
                raise FinetuneConfigError(f"{name} must be True or False.")

    def replace(self, **changes) -> FinetuneConfig:
        """A copy with `changes`; an unknown name is a `TypeError` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"Unknown fine-tuning setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(sorted(names))}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
