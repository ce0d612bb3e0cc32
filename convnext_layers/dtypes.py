"""The dtypes a `ConvNeXt` computes in (`ConvNeXt(dtype=...)`): its body under a keras
dtype policy, its head in float32 when the body is in half precision."""

from __future__ import annotations

import contextlib
import functools

import keras

from convnext_layers.errors import ModelArgumentError

# what `ConvNeXt(dtype=...)` takes: the dtype its body computes and keeps its weights in
DTYPES = ("float32", "bfloat16")


def check_dtype(dtype) -> str | None:
    """`dtype` as a `DTYPES` name (None stays None: keras' global policy); a clear
    `ModelArgumentError` otherwise."""
    if dtype is None:
        return None
    name = getattr(dtype, "name", dtype)  # a numpy / ml_dtypes dtype
    if not isinstance(name, str) or name not in DTYPES:
        raise ModelArgumentError(
            f"dtype must be one of {', '.join(DTYPES)} (or None: keras' policy); got {dtype!r}."
        )
    return name


@contextlib.contextmanager
def dtype_policy(name: str | None):
    """Keras' global dtype policy set to `name` within the block (None: unchanged);
    what a model built inside computes and keeps its weights in."""
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def head_dtype() -> str | None:
    """float32 for the head of a model built in bfloat16 / float16 (pooling, head
    norm, classifier, L2: a few (B, C) vectors, where half precision would cost
    accuracy and save nothing); None (the policy) otherwise."""
    policy = keras.config.dtype_policy()
    half = policy.compute_dtype in ("bfloat16", "float16")
    return "float32" if half and policy.variable_dtype == policy.compute_dtype else None


def built_in_dtype(init):
    """`ConvNeXt.__init__` with a `dtype` argument (`DTYPES`): the layers are made
    under that keras dtype policy (the head in float32, `head_dtype`)."""

    # (self, config, ...) and not (self, *args, ...): keras' clone_model takes a class
    # whose __init__ has *args and **kwargs for a functional one and calls it with
    # (inputs, outputs)
    @functools.wraps(init)
    def __init__(self, config, *, dtype=None, **kwargs):
        dtype = check_dtype(dtype)
        with dtype_policy(dtype):
            init(self, config, **kwargs)
        object.__setattr__(self, "_dtype_argument", dtype)

    return __init__
