"""`ConvNeXt`: the one model class behind every V1 / V2 variant, every timm
architecture and every head (classifier, features, pre-logits, embedding).

It is a functional `keras.Model` built from a `ConvNeXtConfig` plus the head
options; `get_config` returns exactly the constructor arguments (the config,
the head, the input shape, and timm's architecture name and `pretrained_cfg`),
so `keras.saving.load_model("m.keras")` rebuilds a model that knows what it is
and how its inputs are preprocessed, with no sidecar file.

Layer names follow timm's module paths, which is what `weights_convert` maps:

| Keras layer | timm module |
|---|---|
| `stem_conv`, `stem_norm` (patch stem) | `stem.0`, `stem.1` |
| `stem_<i>_conv`, `stem_<i>_norm` (overlapping stems) | `stem.<i>` |
| `stage<s>_downsample_norm`, `stage<s>_downsample_conv` | `stages.<s>.downsample.0`, `.1` |
| `stage<s>_block<b>_dwconv` | `stages.<s>.blocks.<b>.conv_dw` |
| `stage<s>_block<b>_norm` | `stages.<s>.blocks.<b>.norm` |
| `stage<s>_block<b>_pwconv1`, `_grn`, `_pwconv2` | `stages.<s>.blocks.<b>.mlp.{fc1,grn,fc2}` |
| `stage<s>_block<b>_layer_scale` | `stages.<s>.blocks.<b>` (its `gamma`) |
| `norm_pre` (head_norm_first) | `norm_pre` |
| `head_norm`, `head_pre_logits`, `head_fc` | `head.norm`, `head.pre_logits.fc`, `head.fc` |
"""

from __future__ import annotations

import math

import keras
import numpy as np

from convnext_layers import fast_ops
from convnext_layers.config import (
    ConfigError,
    ConvNeXtConfig,
    plan_strides,
    stem_strides,
)
from convnext_layers.layers import (
    POOLINGS,
    DepthwiseConv,
    DownsampleConv,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    StochasticDepth,
    activation_function,
    exact_gelu,
    norm_layer,
    pooling_layer,
)

POOLING_CHOICES = (None, *POOLINGS)


class ModelArgumentError(ValueError):
    """An argument to a ConvNeXt model that is of the wrong type or value."""


def downsample_conv(filters, kernel, stride, name, use_bias=True):
    # stride == kernel: timm's non-overlapping conv ("valid", floor); a lowered
    # stride for small inputs overlaps, padded "same"
    padding = "valid" if stride == kernel else "same"
    return DownsampleConv(
        filters, kernel, strides=stride, padding=padding, use_bias=use_bias, name=name
    )


def convnext_block(x, width, kernel_size, prefix, drop_path, config: ConvNeXtConfig):
    """One ConvNeXt block: (B, H, W, C) -> (B, H, W, C), C = `width`.

    dwconv k x k -> norm -> Dense (mlp_ratio C) -> activation (-> GRN, V2) ->
    Dense C (-> layer scale, V1) -> stochastic depth -> + shortcut.
    """
    shortcut = x
    x = DepthwiseConv(kernel_size, use_bias=config.conv_bias, name=f"{prefix}_dwconv")(x)
    x = norm_layer(config.norm, config.norm_eps, f"{prefix}_norm")(x)
    # the activation inside the Dense, so torch and TensorFlow can fuse the two
    hidden = int(config.mlp_ratio * width)
    activation = activation_function(config.activation)
    x = PointwiseDense(hidden, activation=activation, name=f"{prefix}_pwconv1")(x)
    if config.use_grn:
        x = GlobalResponseNorm(name=f"{prefix}_grn")(x)
    x = PointwiseDense(width, name=f"{prefix}_pwconv2")(x)
    if config.layer_scale_init_value is not None:
        x = LayerScale(config.layer_scale_init_value, name=f"{prefix}_layer_scale")(x)
    if drop_path > 0.0:
        x = StochasticDepth(drop_path, name=f"{prefix}_drop_path")(x)
    return keras.layers.Add(name=f"{prefix}_add")([shortcut, x])


def _stem(x, config: ConvNeXtConfig, stride: int):
    """(B, H, W, C_in) -> (B, H/stride, W/stride, widths[0])."""
    width, norm = config.widths[0], config.norm
    if config.stem == "patch":
        x = downsample_conv(width, config.patch_size, stride, "stem_conv", config.conv_bias)(x)
        return norm_layer(norm, config.norm_eps, "stem_norm")(x)
    # overlapping stems: two 3x3 convs, padding 1 on every side (as torch), the
    # names carry timm's Sequential index
    first, second = stem_strides(config.stem, stride)
    index = 0
    x = DownsampleConv(
        config.stem_mid_width,
        3,
        strides=first,
        explicit_padding=1,
        use_bias=config.conv_bias,
        name="stem_0_conv",
    )(x)
    index += 1
    if config.stem == "overlap_act":
        x = keras.layers.Activation(activation_function(config.activation), name="stem_1_act")(x)
        index += 1
    x = DownsampleConv(
        width, 3, strides=second, explicit_padding=1, use_bias=config.conv_bias,
        name=f"stem_{index}_conv",
    )(x)  # fmt: skip
    return norm_layer(norm, config.norm_eps, f"stem_{index + 1}_norm")(x)


def _drop_path_rates(depths, drop_path_rate):
    # a linear rise 0 -> drop_path_rate over all blocks, as timm
    total = sum(depths)
    return [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]


def _check_head_arguments(num_classes, include_top, pooling, head_norm, normalize, output_stages):
    if not isinstance(include_top, bool):
        raise ModelArgumentError(f"include_top must be True or False, got {include_top!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ModelArgumentError(
            f"num_classes must be an int (0 for pre-logits features), got {num_classes!r}."
        )
    if num_classes < 0:
        raise ModelArgumentError(f"num_classes must be >= 0, got {num_classes}.")
    if pooling not in POOLING_CHOICES:
        raise ModelArgumentError(
            f"pooling must be one of None, {', '.join(repr(p) for p in POOLINGS)}; got {pooling!r}."
        )
    for name, value in (("head_norm", head_norm), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise ModelArgumentError(f"{name} must be True or False, got {value!r}.")
    if output_stages is not None:
        if isinstance(output_stages, (str, bytes)) or not hasattr(output_stages, "__iter__"):
            raise ModelArgumentError(
                f"output_stages must be a tuple of stage indices from (0, 1, 2, 3), e.g. "
                f"(1, 2, 3); got {output_stages!r}."
            )
        stages = tuple(output_stages)
        if (
            not stages
            or any(isinstance(s, bool) or s not in (0, 1, 2, 3) for s in stages)
            or len(set(stages)) != len(stages)
        ):
            raise ModelArgumentError(
                "output_stages must be distinct stage indices from (0, 1, 2, 3); "
                f"got {output_stages!r}."
            )
        if include_top or pooling is not None or normalize:
            raise ModelArgumentError(
                "output_stages needs include_top=False, pooling=None and normalize=False."
            )


def _check_drop_path_rate(rate):
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ModelArgumentError(f"drop_path_rate must be a number in [0, 1), got {rate!r}.")


def _input_layer(input_shape, input_tensor):
    """(keras input, (H, W, C)) for the model; H and W may be None (any size)."""
    if input_tensor is not None:
        if input_shape is None:
            input_shape = tuple(input_tensor.shape[1:])
        if not keras.backend.is_keras_tensor(input_tensor):
            return keras.Input(tensor=input_tensor, shape=input_shape), tuple(input_shape)
        return input_tensor, tuple(input_shape)
    if input_shape is None:
        input_shape = (None, None, 3)
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__"):
        raise ModelArgumentError(
            f"input_shape must be (height, width, channels), e.g. (224, 224, 3); "
            f"got {input_shape!r}."
        )
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ModelArgumentError(
            f"input_shape must be (height, width, channels), e.g. (224, 224, 3); "
            f"got {input_shape!r} of rank {len(input_shape)}."
        )
    for dim in input_shape:
        if dim is not None and (
            isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1
        ):
            raise ModelArgumentError(
                f"input_shape entries must be positive ints (or None for height / width); "
                f"got {input_shape!r}."
            )
    height, width, channels = input_shape
    if channels is None:
        raise ModelArgumentError(f"input_shape needs a known channel count; got {input_shape!r}.")
    if height is not None and height <= 4 < channels:
        raise ModelArgumentError(
            f"input_shape {input_shape!r} looks channels-first (channels, height, width); "
            f"these models take channels-last (height, width, channels), e.g. "
            f"({width}, {channels}, {height})."
        )
    input_shape = tuple(None if d is None else int(d) for d in input_shape)
    return keras.Input(shape=input_shape, name="image"), input_shape


@keras.saving.register_keras_serializable(package="convnext")
class ConvNeXt(keras.Model):
    """A ConvNeXt (V1 or V2, any timm architecture) as a functional `keras.Model`.

    Args:
        config: a `ConvNeXtConfig` (or its dict): the architecture.
        num_classes: classifier outputs with `include_top`; 0 ends at timm's
            pre-logits features (pool -> head norm [-> pre-logits Dense + GELU]).
        include_top: build the head (pool, head norm, pre-logits layer, classifier).
            False: the backbone's feature map (B, h, w, C), or with `pooling`
            only that pooling (B, C), as keras.applications does.
        pooling: None, "avg", "max" or "gem" (generalised mean, learnable p
            starting at `gem_p`). With include_top the head pools with it
            (default "avg", as timm).
        head_norm: with include_top, apply the head norm after pooling (timm's).
        normalize: L2-normalise the output (an embedding model).
        classifier_activation: activation of the classifier (None: logits).
        input_shape: (height, width, channels); default (None, None, 3): any
            size, like timm, with the standard strides. A fixed side under 64
            gets lowered strides (see `plan_strides`).
        input_tensor: an optional tensor to use as the model input.
        output_stages: with include_top=False, a tuple of stage indices (0..3):
            the model returns those stages' feature maps (timm's features_only).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        timm_architecture: timm's name for this architecture (e.g. "convnext_atto").
        pretrained_cfg: timm's pretrained_cfg of the weights (input size,
            interpolation, crop, mean/std, license, ...), saved with the model.
        metadata: any other JSON-able facts to keep with the model (fine-tuning
            results, a calibrated verification threshold, ...).
        name: the model's name.

    Input (B, H, W, C) float images, normalised as the weights expect
    (`pretrained_cfg`: RGB in [0, 1], then (x - mean) / std).
    """

    def __init__(
        self,
        config,
        *,
        num_classes: int = 1000,
        include_top: bool = True,
        pooling: str | None = None,
        head_norm: bool = True,
        normalize: bool = False,
        gem_p: float = 3.0,
        classifier_activation=None,
        input_shape=None,
        input_tensor=None,
        output_stages=None,
        drop_path_rate: float = 0.0,
        timm_architecture: str | None = None,
        pretrained_cfg: dict | None = None,
        metadata: dict | None = None,
        name: str | None = None,
        **kwargs,
    ):
        try:
            config = ConvNeXtConfig.from_dict(config)
        except ConfigError as error:
            raise ModelArgumentError(str(error)) from None
        _check_head_arguments(
            num_classes, include_top, pooling, head_norm, normalize, output_stages
        )
        _check_drop_path_rate(drop_path_rate)
        for argument, value in (("pretrained_cfg", pretrained_cfg), ("metadata", metadata)):
            if value is not None and not isinstance(value, dict):
                raise ModelArgumentError(
                    f"{argument} must be a dict or None, got {type(value).__name__}."
                )
        num_classes = int(num_classes)
        inputs, shape = _input_layer(input_shape, input_tensor)
        strides = plan_strides(shape[0], shape[1], config.stem, config.patch_size)

        x = _stem(inputs, config, strides[0])
        rates = iter(_drop_path_rates(config.depths, float(drop_path_rate)))
        stage_outputs = []
        for stage, (depth, width) in enumerate(zip(config.depths, config.widths, strict=True)):
            if stage > 0:
                x = norm_layer(config.norm, config.norm_eps, f"stage{stage}_downsample_norm")(x)
                x = downsample_conv(
                    width, 2, strides[stage], f"stage{stage}_downsample_conv", config.conv_bias
                )(x)
            for block in range(depth):
                x = convnext_block(
                    x,
                    width,
                    config.kernel_sizes[stage],
                    f"stage{stage}_block{block}",
                    next(rates),
                    config,
                )
            stage_outputs.append(x)

        if output_stages is not None:
            outputs = [stage_outputs[s] for s in output_stages]
        else:
            if config.head_norm_first:  # timm's forward_features ends with norm_pre
                x = norm_layer(config.norm, config.norm_eps, "norm_pre")(x)
            outputs = self._head(
                x, config, num_classes, include_top, pooling, head_norm, gem_p,
                classifier_activation,
            )  # fmt: skip
            if normalize:
                outputs = keras.layers.UnitNormalization(axis=-1, name="embedding_l2")(outputs)
        super().__init__(inputs, outputs, name=name or timm_architecture or "convnext", **kwargs)

        # what the model is (plain attributes: not tracked, the same on every backend)
        for attribute, value in (
            ("convnext_config", config),
            ("num_classes", num_classes if include_top else 0),
            ("include_top", include_top),
            ("pooling", pooling),
            ("head_norm", head_norm),
            ("normalize", normalize),
            ("gem_p", float(gem_p)),
            ("classifier_activation", classifier_activation),
            ("output_stages", None if output_stages is None else tuple(output_stages)),
            ("drop_path_rate", float(drop_path_rate)),
            ("strides", strides),
            ("timm_architecture", timm_architecture),
            ("pretrained_cfg", dict(pretrained_cfg or {})),
            ("metadata", dict(metadata or {})),
        ):
            object.__setattr__(self, attribute, value)
        object.__setattr__(self, "_input_shape_arg", None if input_shape is None else list(shape))

    @staticmethod
    def _head(x, config, num_classes, include_top, pooling, head_norm, gem_p, activation):
        """The one place the head is laid out: (B, h, w, C) -> the model's output."""
        if not include_top:
            return x if pooling is None else pooling_layer(pooling, "head_pool", gem_p)(x)
        x = pooling_layer(pooling or "avg", "head_pool", gem_p)(x)
        if head_norm and not config.head_norm_first:
            x = norm_layer(config.norm, config.norm_eps, "head_norm")(x)
        if config.head_hidden_size:  # timm's NormMlpClassifierHead: Linear + GELU pre-logits
            x = keras.layers.Dense(
                config.head_hidden_size, activation=exact_gelu, name="head_pre_logits"
            )(x)
        if num_classes:
            x = keras.layers.Dense(num_classes, activation=activation, name="head_fc")(x)
        return x

    def with_head(self, **head_options) -> ConvNeXt:
        """A new `ConvNeXt` with this model's backbone weights (shared values, copied)
        and another head: any of num_classes, include_top, pooling, head_norm,
        normalize, gem_p, classifier_activation, input_shape, output_stages,
        metadata. Head layers both models have (same name and shapes) keep their
        weights; new ones get their initialisers."""
        config = {**self.get_config(), **head_options}
        values = _weights_by_name(self)
        if not fast_ops.supports_deferred_variables():
            model = type(self).from_config(config)
            _copy_matching(model, values)
            return model
        with keras.StatelessScope(initialize_variables=False):
            model = type(self).from_config(config)
        names = {id(v): key for key, v in _weights_by_name(model).items()}

        def value_of(variable):
            source = values.get(names.get(id(variable)))
            if source is None or tuple(source.shape) != tuple(variable.shape):
                return None
            return lambda shape, dtype=None: keras.ops.convert_to_numpy(source)

        fast_ops.initialize_deferred(model.weights, value_of)
        return model

    @property
    def features_size(self) -> int:
        """Channels of the last feature map."""
        return self.convnext_config.num_features

    def get_config(self):
        activation = self.classifier_activation
        if activation is not None and not isinstance(activation, str):
            activation = keras.activations.serialize(activation)
        return {
            "config": self.convnext_config.to_dict(),
            "num_classes": self.num_classes,
            "include_top": self.include_top,
            "pooling": self.pooling,
            "head_norm": self.head_norm,
            "normalize": self.normalize,
            "gem_p": self.gem_p,
            "classifier_activation": activation,
            "input_shape": self._input_shape_arg,
            "output_stages": None if self.output_stages is None else list(self.output_stages),
            "drop_path_rate": self.drop_path_rate,
            "timm_architecture": self.timm_architecture,
            "pretrained_cfg": jsonable(self.pretrained_cfg),
            "metadata": jsonable(self.metadata),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None, weights=None):
        """The model of a `get_config` dict. `weights` ({variable path: array}, e.g.
        read from a safetensors file) initialises every variable straight from its
        array instead of its random initializer; a missing or mis-shaped one is a
        ValueError listing them."""
        config = dict(config)
        activation = config.get("classifier_activation")
        if isinstance(activation, dict):
            config["classifier_activation"] = keras.activations.deserialize(
                activation, custom_objects=custom_objects
            )
        if weights is not None:
            return _build_deferred(cls, config, weights)
        if _FAST_LOAD.active:  # the weights are read from the file next: skip random init
            return _build_deferred(cls, config)
        return cls(**config)

    def weights_by_path(self) -> dict:
        """{variable path: numpy array} of every weight (what `from_config(weights=...)` takes)."""
        return {v.path: keras.ops.convert_to_numpy(v) for v in self.weights}


def _weights_by_name(model) -> dict:
    """{(layer name, variable name): variable} of every weight in `model`."""
    return {
        (layer.name, variable.path.split("/")[-1]): variable
        for layer in fast_ops.flatten_layers(model)
        for variable in layer.weights
    }


def _copy_matching(model, values):
    for key, variable in _weights_by_name(model).items():
        source = values.get(key)
        if source is not None and tuple(source.shape) == tuple(variable.shape):
            variable.assign(keras.ops.convert_to_numpy(source))


def jsonable(value):
    """`value` with tuples as lists and numpy scalars as Python numbers (JSON-able)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _FastLoad:
    """While active, `ConvNeXt.from_config` builds its variables without running their
    random initializers (their values are about to be read from a file)."""

    active = False


_FAST_LOAD = _FastLoad()


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


def _build_deferred(cls, config, weights=None):
    """`cls(**config)` with its variables initialised from `weights` ({path: array}), or
    with zeros when `weights` is None (their values are loaded right after), never
    with their random initializers (on JAX, one compiled kernel per weight shape)."""
    if not fast_ops.supports_deferred_variables():
        model = cls(**config)
        if weights is not None:
            _check_weights(model.weights, weights)
            for variable in model.weights:
                variable.assign(np.asarray(weights[variable.path]))
        return model
    with keras.StatelessScope(initialize_variables=False):
        model = cls(**config)
    variables = list(model.weights)
    if not fast_ops.variables_are_deferred(variables):  # pragma: no cover - other Keras
        return model
    if weights is not None:
        try:
            _check_weights(variables, weights)
        except ValueError:
            fast_ops.forget_deferred(variables)
            raise

    def value_of(variable):
        if weights is None:
            return lambda shape, dtype=None: np.zeros(shape, dtype=dtype or "float32")
        array = weights[variable.path]
        return lambda shape, dtype=None: np.asarray(array, dtype=dtype or array.dtype)

    fast_ops.initialize_deferred(variables, value_of)
    return model


def load_saved_model(path, **kwargs):
    """`keras.saving.load_model(path)` of a file holding `ConvNeXt` models, without
    the random initialisation of every weight before the file's values replace it
    (on JAX that compiled one kernel per weight shape: 28 for convnext_atto)."""
    previous = _FAST_LOAD.active
    _FAST_LOAD.active = True
    try:
        return keras.saving.load_model(path, **kwargs)
    finally:
        _FAST_LOAD.active = previous


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
