"""Building a `ConvNeXt` straight from weight values (no random initialisation first),
reading `.keras` files that way, and the small helpers saving needs."""

from __future__ import annotations

import contextlib

import keras
import numpy as np

from convnext_layers import fast_ops
from convnext_layers.errors import ModelArgumentError


def weights_by_name(model) -> dict:
    """{(layer name, variable name): variable} of every weight in `model`."""
    return {
        (layer.name, variable.path.split("/")[-1]): variable
        for layer in fast_ops.flatten_layers(model)
        for variable in layer.weights
    }


class _FastLoad:
    """While active, `ConvNeXt.from_config` builds its variables without running their
    random initializers (their values are about to be read from a file)."""

    active = False

    @contextlib.contextmanager
    def enabled(self):
        previous = self.active
        self.active = True
        try:
            yield
        finally:
            self.active = previous


FAST_LOAD = _FastLoad()


def _check_weights(variables, weights):
    problems = []
    for variable in variables:
        array = weights.get(variable.path)
        if array is None:
            problems.append(f"missing {variable.path}")
        elif tuple(np.shape(array)) != tuple(variable.shape):
            problems.append(
                f"{variable.path}: expected {tuple(variable.shape)}, found {np.shape(array)}"
            )
    extra = set(weights) - {v.path for v in variables}
    problems += [f"unexpected {path}" for path in sorted(extra)]
    if problems:
        raise ValueError("The weights do not fit the model: " + "; ".join(problems[:10]))


def build_deferred(cls, config, weights=None):
    """`cls(**config)` with its variables initialised from `weights` ({path: array}), or
    with zeros when `weights` is None (their values are loaded right after), never
    with their random initializers (on JAX, one compiled kernel per weight shape)."""

    def initial_values(model):
        if weights is None:
            return lambda variable: lambda shape, dtype=None: np.zeros(shape, dtype or "float32")
        _check_weights(model.weights, weights)

        def value_of(variable):
            array = weights[variable.path]
            return lambda shape, dtype=None: np.asarray(array, dtype=dtype or array.dtype)

        return value_of

    return fast_ops.build_with_initial_values(lambda: cls(**config), initial_values)


def load_saved_model(path, **kwargs):
    """`keras.saving.load_model(path)` of a file holding `ConvNeXt` models, without
    the random initialisation of every weight before the file's values replace it
    (on JAX that compiled one kernel per weight shape: 28 for convnext_atto)."""
    with FAST_LOAD.enabled():
        return keras.saving.load_model(path, **kwargs)


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one image through `model`'s convolutions and dense
    layers (what `torch.utils.flop_counter` counts for timm, divided by 2).

    Needs a model built with a fixed input size. Norms, activations and
    additions are left out, as in the published ConvNeXt GMAC figures.
    """
    macs = 0
    for layer in fast_ops.flatten_layers(model):
        kernel = getattr(layer, "kernel", None)
        if not layer.weights or kernel is None:
            continue
        out_shape = layer.output.shape
        if any(d is None for d in out_shape[1:]):
            raise ModelArgumentError(
                "count_macs needs a model built with a fixed input size, e.g. "
                "input_shape=(224, 224, 3)."
            )
        positions = int(np.prod(out_shape[1:-1])) if len(out_shape) > 2 else 1
        if isinstance(
            layer, (keras.layers.DepthwiseConv2D, keras.layers.Conv2D, keras.layers.Dense)
        ):
            macs += positions * int(np.prod(kernel.shape))
    return macs
