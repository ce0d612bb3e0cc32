"""Keras' private hooks `fast_ops` uses, each with a public fallback: the walk over
every nested layer, and building a model straight from checkpoint values
(deferred variable initialisation)."""

from __future__ import annotations

import collections

import keras

from convnext_layers import fast_ops


def _keras_flatten_layers(model):
    """The private Keras walk (the one place it is called)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def flatten_layers(model):
    """Every layer inside `model`, nested models' layers included (not the model)."""

    def walk():  # the same order as keras' walk, through the public `.layers`
        found, seen = [], set()
        queue = collections.deque(getattr(model, "layers", []))
        while queue:
            layer = queue.popleft()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            found.append(layer)
            queue.extendleft(getattr(layer, "layers", None) or [])
        return found

    if fast_ops.fast_paths_allowed("flatten_layers"):
        return fast_ops.guarded("flatten_layers", lambda: _keras_flatten_layers(model), walk)
    return walk()


def _keras_stored_value(variable):
    """Keras' private attribute holding a variable's tensor (the one place it is read)."""
    return variable._value


def _keras_in_stateless_scope() -> bool:
    """Whether a `keras.StatelessScope` is in effect (Keras' private module, the one
    place it is asked)."""
    # Keras' private module: imported when asked (`stored_values` falls back to `.value`
    # if it is missing)
    from keras.src.backend.common.stateless_scope import in_stateless_scope

    return in_stateless_scope()


def stored_values(variables) -> tuple:
    """Each of `variables`' backend tensors as stored: what `.value` returns for an
    initialised variable outside a `keras.StatelessScope`, without an autocast scope's
    cast (callers convert to the dtype they compute in), and without `.value`'s
    checks on every read (on torch 1.8 us a read against 0.03 us; a block's
    kernels read about 11). `.value` inside a StatelessScope (its values are the
    scope's), for an uninitialised variable, and when this fast path is off."""

    def read():
        return tuple(variable.value for variable in variables)

    if not fast_ops.fast_paths_allowed("stored_values"):
        return read()

    def stored():
        if _keras_in_stateless_scope():
            return read()
        values = tuple(_keras_stored_value(variable) for variable in variables)
        return read() if any(value is None for value in values) else values

    return fast_ops.guarded("stored_values", stored, read)


def _keras_initialize_all_variables():
    """Keras' private initialisation of deferred variables (the one place it is called)."""
    # Keras' private module: imported when used (`supports_deferred_variables` checked it)
    from keras.src.backend.common.variables import initialize_all_variables

    initialize_all_variables()


def supports_deferred_variables() -> bool:
    """Whether variables made inside `keras.StatelessScope(initialize_variables=False)`
    can be initialised later from values of our choice (Keras' private initialisation
    hooks are present, and the fast path is on)."""
    if not fast_ops.fast_paths_allowed("deferred_variables"):
        return False
    # Keras' private modules: imported here to find whether this Keras has them
    try:
        from keras.src.backend.common import global_state  # noqa: F401
        from keras.src.backend.common.variables import initialize_all_variables  # noqa: F401
    except ImportError:
        return False
    return True


def initialize_deferred(variables, values) -> None:
    """Initialise deferred `variables` from `values(variable) -> initializer or None`
    (None keeps the variable's own initializer). Private Keras API: use
    `build_with_initial_values`, which falls back when this is missing or fails."""
    for variable in variables:
        make = values(variable)
        if make is not None:
            variable._initializer = make
    _keras_initialize_all_variables()


def forget_deferred(variables) -> None:
    """Drop never-initialised variables from Keras' pending list (after a failed build),
    so a later unrelated initialisation does not trip over them."""
    # Keras' private module: imported inside the try, as another Keras may lack it
    try:
        from keras.src.backend.common import global_state

        ids = {id(v) for v in variables}
        pending = global_state.get_global_attribute("uninitialized_variables") or []
        global_state.set_global_attribute(
            "uninitialized_variables", [v for v in pending if id(v) not in ids]
        )
    except Exception as error:  # pragma: no cover - other Keras versions
        fast_ops._disable("deferred_variables", error)


def variables_are_deferred(variables) -> bool:
    """Whether every variable was created uninitialised (deferred) by a StatelessScope."""
    return all(
        getattr(v, "_value", 0) is None and getattr(v, "_initializer", None) is not None
        for v in variables
    )


def build_with_initial_values(build, initial_values):
    """`build()` a model whose variables start from values of our choice.

    `initial_values(model)` returns `value_of(variable)`: an initializer
    `(shape, dtype) -> array` for the variable, or None to keep its own. With
    Keras' private hooks the model is built with uninitialised variables, which
    are then initialised once from those values (no random initialisation first:
    on JAX that compiles one kernel per weight shape); without them, or if they
    fail, the model is built normally and the values assigned. Whatever `build`
    or `initial_values` raise is raised, with nothing left pending.
    """
    if supports_deferred_variables():
        with keras.StatelessScope(initialize_variables=False):
            model = build()
        variables = list(model.weights)
        if variables_are_deferred(variables):
            try:
                value_of = initial_values(model)
            except BaseException:
                forget_deferred(variables)
                raise
            try:
                initialize_deferred(variables, value_of)
                return model
            except Exception as error:
                forget_deferred(variables)
                fast_ops._disable("deferred_variables", error)
        else:  # pragma: no cover - a Keras that initialises inside the scope anyway
            initialize_deferred([], lambda v: None)
    model = build()
    value_of = initial_values(model)
    for variable in model.weights:
        make = value_of(variable)
        if make is not None:
            variable.assign(make(tuple(variable.shape), variable.dtype))
    return model
