"""`ConvNeXt`: the one model class behind every V1 / V2 variant, every timm
architecture and every head (classifier, features, pre-logits, embedding).

It is a functional `keras.Model` built from a `ConvNeXtConfig` plus the head
options; `get_config` returns exactly the constructor arguments (the config,
the head, the input shape, and timm's architecture name and `pretrained_cfg`),
so `keras.saving.load_model("m.keras")` rebuilds a model that knows what it is
and how its inputs are preprocessed, with no sidecar file.

Layer names follow timm's module paths, which is what `weights_convert` maps
(stage 0 has a downsampling too where timm's has one: a patch stem of stride 2):

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
import time

import keras
import numpy as np

from convnext_common.jsonable import jsonable
from convnext_layers import fast_ops, presets
from convnext_layers.config import ConvNeXtConfig
from convnext_layers.dtypes import built_in_dtype
from convnext_layers.errors import ConfigError, ModelArgumentError
from convnext_layers.layers import POOLINGS
from convnext_layers.loading import (
    FAST_LOAD,
    build_deferred,
    count_macs,
    load_saved_model,
    weights_by_name,
)
from convnext_layers.plan import (
    apply_layer,
    apply_layer_directly,
    build_layer_plan,
    check_pooling,
)

POOLING_CHOICES = (None, *POOLINGS)
__all__ = [
    "POOLING_CHOICES",
    "ConvNeXt",
    "ModelArgumentError",
    "count_macs",
    "load_saved_model",
]


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


def _check_rates_and_records(drop_path_rate, drop_rate, pretrained_cfg, metadata):
    for argument, rate in (("drop_path_rate", drop_path_rate), ("drop_rate", drop_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ModelArgumentError(f"{argument} must be a number in [0, 1), got {rate!r}.")
    for argument, value in (("pretrained_cfg", pretrained_cfg), ("metadata", metadata)):
        if value is not None and not isinstance(value, dict):
            raise ModelArgumentError(
                f"{argument} must be a dict or None, got {type(value).__name__}."
            )


def _with_channels(config: ConvNeXtConfig, channels: int) -> ConvNeXtConfig:
    """`config` for an input of `channels` channels: an input_shape with other than 3
    channels sets the default in_chans of 3; any other disagreement is an error."""
    if channels == config.in_chans:
        return config
    if config.in_chans == 3:
        return config.replace(in_chans=int(channels))
    raise ModelArgumentError(
        f"input_shape has {channels} channels but the config's in_chans is {config.in_chans}."
    )


def _input_layer(input_shape, input_tensor, channels=3):
    """(keras input, (H, W, C)) for the model; H and W may be None (any size)."""
    if input_tensor is not None:
        if input_shape is None:
            input_shape = tuple(input_tensor.shape[1:])
        if not keras.backend.is_keras_tensor(input_tensor):
            return keras.Input(tensor=input_tensor, shape=input_shape), tuple(input_shape)
        return input_tensor, tuple(input_shape)
    if input_shape is None:
        input_shape = (None, None, channels)
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
        pooling: None, "avg", "max", "avgmax" (their mean), "catavgmax" (both,
            concatenated: 2C features) or "gem" (generalised mean, learnable p
            starting at `gem_p`). With include_top the head pools with it
            (default "avg", as timm).
        head_norm: with include_top, apply the head norm after pooling (timm's).
        normalize: L2-normalise the output (an embedding model).
        classifier_activation: activation of the classifier (None: logits).
        input_shape: (height, width, channels); default (None, None, in_chans):
            any size, like timm, with timm's strides. A fixed side under 64 gets
            lowered strides (see `plan_layout`). Its channels set the config's
            `in_chans` when that is the default 3, else must equal it.
        input_tensor: an optional tensor to use as the model input.
        output_stages: with include_top=False, a tuple of stage indices (0..3):
            the model returns those stages' feature maps (timm's features_only).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
        drop_rate: dropout before the classifier in training (timm's drop_rate).
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

    Input (B, H, W, C) float images, C = `config.in_chans`, normalised as the
    weights expect (`pretrained_cfg`: RGB, or grey for one channel, in [0, 1],
    then (x - mean) / std).
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
        drop_rate: float = 0.0,
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
        check_pooling(config, pooling, include_top, head_norm)
        _check_rates_and_records(drop_path_rate, drop_rate, pretrained_cfg, metadata)
        num_classes = int(num_classes)
        inputs, shape = _input_layer(input_shape, input_tensor, config.in_chans)
        config = _with_channels(config, shape[2])
        try:
            layout = config.layout(shape[0], shape[1])
        except ValueError as error:
            raise ModelArgumentError(str(error)) from None
        head = {
            "num_classes": num_classes,
            "include_top": include_top,
            "pooling": pooling,
            "head_norm": head_norm,
            "normalize": normalize,
            "gem_p": gem_p,
            "drop_rate": float(drop_rate),
            "classifier_activation": classifier_activation,
        }
        plan = build_layer_plan(config, layout, head, output_stages, drop_path_rate)
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
            ("drop_rate", float(drop_rate)),
            ("layout", layout),
            ("strides", layout.summary()),
            ("timm_architecture", timm_architecture),
            ("pretrained_cfg", dict(pretrained_cfg or {})),
            ("metadata", dict(metadata or {})),
            ("_layer_plan", plan),
        ):
            object.__setattr__(self, attribute, value)
        object.__setattr__(self, "_input_shape_arg", None if input_shape is None else list(shape))

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
                        kernels.residual_dense,
                        kernels.whole,
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
        values = weights_by_name(self)

        def initial_values(model):
            names = {id(v): key for key, v in weights_by_name(model).items()}

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
            "drop_rate": self.drop_rate,
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
            return build_deferred(cls, config, weights)
        if FAST_LOAD.active:  # the weights are read from the file next: skip random init
            return build_deferred(cls, config)
        return cls(**config)

    def save_to_preset(self, preset_dir, *, parity="auto") -> str:
        """Write this model as a keras-hub preset folder (config.json with its
        registered_name, model.weights.h5, metadata.json, README.md model card); see
        `convnext_layers.presets.save_preset`. parity: "auto" measures it against timm
        where timm and weights_convert are importable, None leaves it out."""
        return presets.save_preset(self, preset_dir, parity=parity)

    @classmethod
    def from_preset(cls, preset, **head_options) -> ConvNeXt:
        """The model of a preset: a folder `save_to_preset` wrote, "hf://owner/repo[@rev]"
        holding one, or a timm repository ("hf://timm/convnext_atto.d2_in1k", read by
        weights_convert). `head_options` (num_classes, normalize, ...) give it another
        head (`with_head`). Raises `PresetError` for an incomplete or altered preset."""
        model = presets.load_preset(cls, preset)
        return model.with_head(**head_options) if head_options else model

    def weights_by_path(self) -> dict:
        """{variable path: numpy array} of every weight (what `from_config(weights=...)` takes)."""
        return {v.path: keras.ops.convert_to_numpy(v) for v in self.weights}
