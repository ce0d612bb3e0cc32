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

import difflib
import inspect
import math
import time

import keras
import numpy as np

from convnext_layers import fast_ops
from convnext_layers.config import (
    ConfigError,
    ConvNeXtConfig,
    plan_strides,
    stem_strides,
)
from convnext_layers.dtypes import built_in_dtype, dtype_policy, head_dtype
from convnext_layers.layers import (
    POOLINGS,
    DepthwiseConv,
    DownsampleConv,
    GlobalResponseNorm,
    LayerScale,
    PointwiseDense,
    StochasticDepth,
    activation_function,
    acts_per_position,
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


def apply_layer(layer, x):
    """`layer(x)`: keras' full call (build, dtype casting, masks, symbolic tensors)."""
    return layer(x)


def apply_layer_directly(layer, x):
    """`layer.call(x)`: a built float layer's computation without keras' per-call
    bookkeeping, for inference where every dtype already matches (see
    `LayerPlan.runs_directly`). Measured per layer on torch: about 5-40 us of
    `__call__` work (argument flattening, autocast and name scopes, call context);
    that flattening also leaves each input in a reference cycle until the garbage
    collector runs, so the tensor outlives its last use."""
    return layer.call(x)


class Residual:
    """x + branch(x): a ConvNeXt block as its layers, (B, H, W, C) -> (B, H, W, C).

    Calling it runs the branch's layers in order and then the `Add` layer on
    (shortcut, branch output); the same call builds the functional graph (on
    keras tensors) and runs the layer-by-layer inference (on backend tensors).
    `apply(layer, x)` is how each layer is run (`apply_layer` or
    `apply_layer_directly`). `by_rows(tail, x, shortcut, width)`, when given,
    runs the block's per-position tail (`_pointwise_tail`) instead of calling it
    once: `tail(x, shortcut)` is the rest of the branch and the add, and `width`
    the widest channel count inside it (`fast_ops.jax_by_row_blocks`,
    `fast_ops.torch_by_row_blocks`).
    """

    def __init__(self, branch, add):
        self.branch = tuple(branch)
        self.add = add
        self._tail = _pointwise_tail(self.branch)

    @property
    def layers(self):
        return (*self.branch, self.add)

    def __call__(self, x, apply=apply_layer, by_rows=None):
        shortcut = x
        start = len(self.branch) if by_rows is None or self._tail is None else self._tail[0]
        for layer in self.branch[:start]:
            x = apply(layer, x)

        def tail(x, shortcut):
            for layer in self.branch[start:]:
                x = apply(layer, x)
            return apply(self.add, [shortcut, x])

        if start == len(self.branch):
            return tail(x, shortcut)
        return by_rows(tail, x, shortcut, self._tail[1])


def _pointwise_tail(branch) -> tuple[int, int] | None:
    """(where, width): the branch from layer `where` on acts on each position on its
    own (`acts_per_position`) and holds every pointwise Dense of the block (the
    inverted bottleneck, whose hidden tensor is `width` channels wide); None when
    the block has no such tail (V2: GRN sits between the two Dense layers)."""
    where = len(branch)
    while where > 0 and acts_per_position(branch[where - 1]):
        where -= 1
    denses = [i for i, layer in enumerate(branch) if isinstance(layer, PointwiseDense)]
    if not denses or denses[0] < where:
        return None
    return where, max(branch[i].units for i in denses)


def block_layers(width, kernel_size, prefix, drop_path, config: ConvNeXtConfig) -> Residual:
    """The layers of one ConvNeXt block (C = `width`):

    dwconv k x k -> norm -> Dense (mlp_ratio C) -> activation (-> GRN, V2) ->
    Dense C (-> layer scale, V1) -> stochastic depth -> + shortcut.
    """
    branch = [
        DepthwiseConv(kernel_size, use_bias=config.conv_bias, name=f"{prefix}_dwconv"),
        norm_layer(config.norm, config.norm_eps, f"{prefix}_norm"),
    ]
    # the activation inside the Dense, so torch and TensorFlow can fuse the two
    hidden = int(config.mlp_ratio * width)
    activation = activation_function(config.activation)
    branch.append(PointwiseDense(hidden, activation=activation, name=f"{prefix}_pwconv1"))
    if config.use_grn:
        branch.append(GlobalResponseNorm(name=f"{prefix}_grn"))
    branch.append(PointwiseDense(width, name=f"{prefix}_pwconv2"))
    if config.layer_scale_init_value is not None:
        branch.append(LayerScale(config.layer_scale_init_value, name=f"{prefix}_layer_scale"))
    if drop_path > 0.0:
        branch.append(StochasticDepth(drop_path, name=f"{prefix}_drop_path"))
    return Residual(branch, keras.layers.Add(name=f"{prefix}_add"))


def convnext_block(x, width, kernel_size, prefix, drop_path, config: ConvNeXtConfig):
    """One ConvNeXt block applied to `x`: (B, H, W, C) -> (B, H, W, C), C = `width`."""
    return block_layers(width, kernel_size, prefix, drop_path, config)(x)


def _stem_layers(config: ConvNeXtConfig, stride: int) -> list:
    """(B, H, W, C_in) -> (B, H/stride, W/stride, widths[0])."""
    width, norm = config.widths[0], config.norm
    if config.stem == "patch":
        return [
            downsample_conv(width, config.patch_size, stride, "stem_conv", config.conv_bias),
            norm_layer(norm, config.norm_eps, "stem_norm"),
        ]
    # overlapping stems: two 3x3 convs, padding 1 on every side (as torch), the
    # names carry timm's Sequential index
    first, second = stem_strides(config.stem, stride)
    layers = [
        DownsampleConv(
            config.stem_mid_width,
            3,
            strides=first,
            explicit_padding=1,
            use_bias=config.conv_bias,
            name="stem_0_conv",
        )
    ]
    if config.stem == "overlap_act":
        activation = activation_function(config.activation)
        layers.append(keras.layers.Activation(activation, name="stem_1_act"))
    index = len(layers)
    layers.append(
        DownsampleConv(
            width, 3, strides=second, explicit_padding=1, use_bias=config.conv_bias,
            name=f"stem_{index}_conv",
        )
    )  # fmt: skip
    layers.append(norm_layer(norm, config.norm_eps, f"stem_{index + 1}_norm"))
    return layers


class LayerPlan:
    """A ConvNeXt as the ordered steps its forward pass runs: the stem's layers, each
    stage's layers and `Residual` blocks, and the head's layers.

    `run(x, output_stages, apply, by_rows)` applies them in order to `x`
    (B, H, W, C) and returns the head's output, or the requested stages' feature
    maps (`apply` and `by_rows`: see `Residual`). Only the current
    tensor (and inside a block its shortcut) is held, so on eager backends each
    intermediate is freed after its last use; the model's functional graph is
    built by the same `run` on keras tensors.
    """

    def __init__(self, stem, stages, head):
        self.stem = list(stem)
        self.stages = [list(stage) for stage in stages]
        self.head = list(head)
        self._direct = None  # (dtype, the layers' dtype policies, answer)

    def layers(self):
        """Every layer of the plan, in the order they run."""
        steps = [*self.stem, *(step for stage in self.stages for step in stage), *self.head]
        return [layer for step in steps for layer in getattr(step, "layers", (step,))]

    def body_dtype(self):
        """The dtype the first layer computes in (what the images are converted to)."""
        return self.layers()[0].compute_dtype

    def runs_directly(self, dtype, head=False) -> bool:
        """Whether inference on `dtype` inputs may call each layer's `call` directly:
        every layer of the stem and stages (with `head`, of the head) is built,
        unquantised, and computes in `dtype` with `dtype` variables (nothing for
        keras' `__call__` to cast). The answer is kept until a layer's dtype policy
        object changes (mixed precision, `quantize`): checking every layer took
        ~100 us, a twentieth of a batch-1 atto pass at 32x32."""
        if head:  # a few layers on (B, C) vectors: checked each call
            return _all_direct(self.head, dtype)
        steps = [*self.stem, *(step for stage in self.stages for step in stage)]
        layers = [layer for step in steps for layer in getattr(step, "layers", (step,))]
        policies = [layer.dtype_policy for layer in layers]
        cached = self._direct
        if (
            cached is not None
            and cached[0] == dtype
            and len(cached[1]) == len(policies)
            and all(a is b for a, b in zip(cached[1], policies, strict=True))
        ):
            return cached[2]
        answer = _all_direct(layers, dtype)
        if all(layer.built for layer in layers):
            self._direct = (dtype, policies, answer)
        return answer

    def run(self, x, output_stages=None, apply=apply_layer, by_rows=None, head_apply=None):
        for step in self.stem:
            x = _apply_step(step, x, apply, by_rows)
        wanted = {} if output_stages is None else dict.fromkeys(output_stages)
        for index, stage in enumerate(self.stages):
            if output_stages is not None and index > max(output_stages):
                break
            for step in stage:
                x = _apply_step(step, x, apply, by_rows)
            if index in wanted:
                wanted[index] = x
        if output_stages is not None:
            return [wanted[s] for s in output_stages]
        for step in self.head:
            x = _apply_step(step, x, head_apply or apply, by_rows)
        return x


def _all_direct(layers, dtype) -> bool:
    """Every layer is built, unquantised, and computes in `dtype` with `dtype` variables."""
    name = keras.backend.standardize_dtype(dtype)
    return all(
        layer.built
        and getattr(layer, "quantization_mode", None) is None
        and layer.compute_dtype == name
        and layer.variable_dtype == name
        for layer in layers
    )


def _apply_step(step, x, apply, by_rows):
    return step(x, apply, by_rows) if isinstance(step, Residual) else apply(step, x)


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


# what keras' functional Model takes besides inputs / outputs / name (it drops the rest)
_KERAS_MODEL_ARGUMENTS = ("trainable",)


def _check_unknown_arguments(kwargs):
    """A `TypeError` naming each argument that neither `ConvNeXt` nor keras' functional
    Model takes (keras would drop it without a word: `num_clases=10` would build a
    1000-class model), with the closest valid name."""
    unknown = [name for name in kwargs if name not in _KERAS_MODEL_ARGUMENTS]
    if not unknown:
        return
    parameters = inspect.signature(ConvNeXt.__init__).parameters
    valid = [n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY]
    valid += ["dtype", "layer_scale_init_value", *_KERAS_MODEL_ARGUMENTS]  # the V1 factory's own
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        described.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(
        f"Unknown model argument(s) {', '.join(described)}; the arguments are "
        f"{', '.join(sorted(valid))}."
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
        dtype: "float32" or "bfloat16": the dtype the body computes and keeps its
            weights in (bfloat16: normalisation statistics, GRN and the head,
            L2 included, still in float32); None (default): keras' global dtype
            policy, e.g. mixed precision for training.

    Input (B, H, W, C) float images, normalised as the weights expect
    (`pretrained_cfg`: RGB in [0, 1], then (x - mean) / std).
    """

    @built_in_dtype
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
        _check_unknown_arguments(kwargs)
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

        rates = iter(_drop_path_rates(config.depths, float(drop_path_rate)))
        stages = []
        for stage, (depth, width) in enumerate(zip(config.depths, config.widths, strict=True)):
            steps = []
            if stage > 0:
                steps.append(
                    norm_layer(config.norm, config.norm_eps, f"stage{stage}_downsample_norm")
                )
                steps.append(
                    downsample_conv(
                        width, 2, strides[stage], f"stage{stage}_downsample_conv", config.conv_bias
                    )
                )
            for block in range(depth):
                prefix = f"stage{stage}_block{block}"
                kernel = config.kernel_sizes[stage]
                steps.append(block_layers(width, kernel, prefix, next(rates), config))
            stages.append(steps)
        head = []
        if output_stages is None:
            if config.head_norm_first:  # timm's forward_features ends with norm_pre
                head.append(norm_layer(config.norm, config.norm_eps, "norm_pre"))
            head += self._head_layers(
                config, num_classes, include_top, pooling, head_norm, gem_p, classifier_activation
            )
            if normalize:
                l2 = keras.layers.UnitNormalization
                head.append(l2(axis=-1, name="embedding_l2", dtype=head_dtype()))
        plan = LayerPlan(_stem_layers(config, strides[0]), stages, head)
        outputs = plan.run(inputs, output_stages)
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
            ("_layer_plan", plan),
        ):
            object.__setattr__(self, attribute, value)
        object.__setattr__(self, "_input_shape_arg", None if input_shape is None else list(shape))

    @staticmethod
    def _head_layers(config, num_classes, include_top, pooling, head_norm, gem_p, activation):
        """The one place the head is laid out: the layers (B, h, w, C) -> the output
        (in float32 when the model is built in half precision, `dtypes.head_dtype`)."""
        with dtype_policy(head_dtype()):
            return ConvNeXt._head_layers_of(
                config, num_classes, include_top, pooling, head_norm, gem_p, activation
            )

    @staticmethod
    def _head_layers_of(config, num_classes, include_top, pooling, head_norm, gem_p, activation):
        if not include_top:
            return [] if pooling is None else [pooling_layer(pooling, "head_pool", gem_p)]
        layers = [pooling_layer(pooling or "avg", "head_pool", gem_p)]
        if head_norm and not config.head_norm_first:
            layers.append(norm_layer(config.norm, config.norm_eps, "head_norm"))
        if config.head_hidden_size:  # timm's NormMlpClassifierHead: Linear + GELU pre-logits
            layers.append(
                keras.layers.Dense(
                    config.head_hidden_size, activation=exact_gelu, name="head_pre_logits"
                )
            )
        if num_classes:
            layers.append(keras.layers.Dense(num_classes, activation=activation, name="head_fc"))
        return layers

    def call(self, inputs, training=None, mask=None, **kwargs):
        """Inference (`training` falsy, one image batch) runs the layers one after
        another (`LayerPlan.run`), freeing each intermediate after its last use:
        keras' functional runner keeps them all until the call ends (on torch
        that peaked at 2.7x timm's memory). Training and anything unusual take
        the functional call; both compute the same numbers."""
        x = inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else inputs
        if (
            training
            or mask is not None
            or kwargs
            or not (keras.ops.is_tensor(x) or isinstance(x, np.ndarray))
            or len(x.shape) != 4
            or not fast_ops.fast_paths_allowed("layerwise_call")
        ):
            return super().call(inputs, training=training, mask=mask, **kwargs)

        def layerwise():
            plan = self._layer_plan
            dtype = plan.body_dtype()  # the images as the stem computes them
            images = keras.ops.convert_to_tensor(x, dtype=dtype)
            # a float32 head after a bfloat16 body: keras' call casts its input
            head = None if plan.runs_directly(dtype, head=True) else apply_layer
            if not plan.runs_directly(dtype):
                outputs = plan.run(images, self.output_stages)
            elif (kernels := fast_ops.layer_kernels(images)) is not None:
                outputs = fast_ops.guarded(
                    kernels.name,
                    lambda: plan.run(
                        images,
                        self.output_stages,
                        kernels.apply or apply_layer_directly,
                        kernels.by_rows,
                        head,
                    ),
                    lambda: plan.run(
                        images, self.output_stages, apply_layer_directly, head_apply=head
                    ),
                )
            else:
                direct = apply_layer_directly
                outputs = plan.run(images, self.output_stages, direct, head_apply=head)
            return outputs[0] if isinstance(outputs, list) and len(outputs) == 1 else outputs

        return fast_ops.guarded(
            "layerwise_call",
            layerwise,
            lambda: super(ConvNeXt, self).call(inputs, training=training, mask=mask),
        )

    def predict_batch(self, images):
        """The model's outputs for one batch of images, for inference: (B, H, W, C)
        NumPy (or array-like) -> NumPy, as `predict_on_batch` returns them.

        Lighter than `predict_on_batch` per call (what single images cost): a
        cached jit on JAX, a tf.function per input shape on TensorFlow, the eager
        call under `torch.inference_mode()` on torch (`fast_ops.inference_function`).
        Falls back to `predict_on_batch` where that is not used (a
        `keras.distribution` in effect) or fails.
        """
        images = np.asarray(images)
        dtype = keras.backend.standardize_dtype(self.inputs[0].dtype)
        if images.dtype != dtype:
            images = images.astype(dtype)
        if not fast_ops.fast_paths_allowed("compiled_inference"):
            return self.predict_on_batch(images)
        infer = self.__dict__.get("_inference_function")
        if infer is None:
            infer = fast_ops.inference_function(self)
            if infer is None:
                return self.predict_on_batch(images)
            object.__setattr__(self, "_inference_function", infer)
        return fast_ops.guarded(
            "compiled_inference", lambda: infer(images), lambda: self.predict_on_batch(images)
        )

    def warmup(self, batch_sizes=(1,), image_size=None) -> dict:
        """Runs `predict_batch` once on zeros at each batch size, so that what it
        compiles (JAX's jit, TensorFlow's trace) happens now and not on the first
        request; a service calls it before it reports ready. `image_size`:
        (height, width), needed when the model takes any size. Returns {batch size:
        seconds of that first call}."""
        height, width, channels = self.input_shape[1:]
        if image_size is not None:
            height, width = image_size
        if height is None or width is None:
            raise ModelArgumentError(
                "warmup needs image_size=(height, width) for a model that takes any size."
            )
        seconds = {}
        for size in batch_sizes:
            start = time.perf_counter()
            self.predict_batch(np.zeros((int(size), int(height), int(width), channels), "float32"))
            seconds[int(size)] = time.perf_counter() - start
        return seconds

    def with_head(self, **head_options) -> ConvNeXt:
        """A new `ConvNeXt` with this model's backbone weights (shared values, copied)
        and another head: any of num_classes, include_top, pooling, head_norm,
        normalize, gem_p, classifier_activation, input_shape, output_stages,
        metadata, dtype (the weights then cast to it). Head layers both models
        have (same name and shapes) keep their weights; new ones get their
        initialisers."""
        config = {**self.get_config(), **head_options}
        values = _weights_by_name(self)

        def initial_values(model):
            names = {id(v): key for key, v in _weights_by_name(model).items()}

            def value_of(variable):
                source = values.get(names.get(id(variable)))
                if source is None or tuple(source.shape) != tuple(variable.shape):
                    return None
                return lambda shape, dtype=None: keras.ops.convert_to_numpy(source)

            return value_of

        return fast_ops.build_with_initial_values(
            lambda: type(self).from_config(config), initial_values
        )

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
            "dtype": self.__dict__.get("_dtype_argument"),
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
