"""Running a model over several devices and processes with `keras.distribution`: the one
place a distribution is chosen, counted and a model cloned under it."""

from __future__ import annotations

import keras
import numpy as np

from embedding.errors import FinetuneConfigError


def resolve_distribution(distribution="auto"):
    """None, a `keras.distribution.Distribution`, or "auto": `DataParallel` over all
    devices when the JAX backend sees more than one, else None."""
    if distribution is None or hasattr(distribution, "device_mesh"):
        return distribution
    if distribution != "auto":
        raise FinetuneConfigError(
            f"distribution must be None, 'auto' or a Distribution, got {distribution!r}"
        )
    if keras.backend.backend() != "jax":
        return None
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices)


def device_count(distribution) -> int:
    """How many devices share every batch (1 without a distribution)."""
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))


def process_info(distribution) -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) but for multi-host JAX."""
    if distribution is None or keras.backend.backend() != "jax":
        return 0, 1
    import jax  # the JAX backend is the one in use here

    return jax.process_index(), jax.process_count()


def clone_under(model: keras.Model, distribution) -> keras.Model:
    """`model` rebuilt with its variables created under `distribution` (they must be, to be
    laid out over its devices) and its weights copied; `model` itself without one. The
    attributes the project's models carry (`pretrained_cfg`) come along."""
    if distribution is None:
        return model
    with distribution.scope():
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    if hasattr(model, "pretrained_cfg"):
        clone.pretrained_cfg = dict(model.pretrained_cfg or {})
    return clone
