"""A ConvNeXt as the steps its forward pass runs (`LayerPlan`): the stem's layers, each
stage's downsampling and `Residual` blocks, and the head, laid out from a
`ConvNeXtConfig` and its `StageLayout` (`build_layer_plan`).

The same plan builds the functional graph (on keras tensors) and runs the
layer-by-layer inference (on backend tensors, see `ConvNeXt.call`). Layer names
follow timm's module paths, which is what `weights_convert` maps (see
`convnext_layers.model`).
"""

from __future__ import annotations

from typing import NamedTuple

import keras

from convnext_layers.config import ConvNeXtConfig
from convnext_layers.dtypes import dtype_policy, head_dtype
from convnext_layers.errors import ModelArgumentError
from convnext_layers.layers import (
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
from convnext_layers.strides import StageLayout, conv_padding, stem_strides


def downsample_conv(filters, kernel, stride, name, use_bias=True, dilation=1):
    """A stem / downsampling conv: "valid" where it tiles its input as timm's does,
    "same" for a stride lowered for a small input or a dilated conv (`conv_padding`)."""
    return DownsampleConv(
        filters,
        kernel,
        strides=stride,
        dilation_rate=dilation,
        padding=conv_padding(kernel, stride, dilation),
        use_bias=use_bias,
        name=name,
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
    the widest channel count inside it (`fast_ops.jax_kernels.jax_by_row_blocks`,
    `fast_ops.torch_kernels.torch_by_row_blocks`). `residual_dense(x, shortcut,
    dense, scales, unfused)`, when given, runs the block's output part (its last
    pointwise Dense, the layer scales after it and the add; `_output_part`) as one
    product with the shortcut added, `unfused()` being the layers one by one
    (`fast_ops.torch_kernels.residual_dense`). `whole(parts, x, layers, blocked)`,
    when given, runs a block that is the plain inverted bottleneck (`parts`, a
    `BlockParts`) at once, `layers()` being the block layer by layer as above and
    `blocked` whether that would hand its tail to `by_rows`
    (`fast_ops.torch_kernels.whole_block`).
    """

    def __init__(self, branch, add):
        self.branch = tuple(branch)
        self.add = add
        self._tail = _pointwise_tail(self.branch)
        self._output = _output_part(self.branch)
        after_output = self.branch[self._output + 1 :] if self._output is not None else ()
        self._output_scales = tuple(
            layer for layer in after_output if isinstance(layer, LayerScale)
        )
        self.parts = _block_parts(self.branch, self._output, self._output_scales)

    @property
    def layers(self):
        return (*self.branch, self.add)

    def __call__(self, x, apply=apply_layer, by_rows=None, residual_dense=None, whole=None):
        if whole is not None and self.parts is not None:
            blocked = by_rows is not None and self._tail is not None
            return whole(
                self.parts, x, lambda: self._layers(x, apply, by_rows, residual_dense), blocked
            )
        return self._layers(x, apply, by_rows, residual_dense)

    def _layers(self, x, apply, by_rows, residual_dense):
        shortcut = x
        fused = residual_dense is not None and self._output is not None
        stop = self._output if fused else len(self.branch)  # the layers before the add
        blocked = by_rows is not None and self._tail is not None
        start = min(self._tail[0], stop) if blocked else stop  # where by_rows takes over
        for layer in self.branch[:start]:
            x = apply(layer, x)

        def unfused_output(x, shortcut):
            for layer in self.branch[stop:]:
                x = apply(layer, x)
            return apply(self.add, [shortcut, x])

        def tail(x, shortcut):
            for layer in self.branch[start:stop]:
                x = apply(layer, x)
            if stop == len(self.branch):
                return apply(self.add, [shortcut, x])
            scales = tuple(layer.gamma for layer in self._output_scales)
            return residual_dense(
                x, shortcut, self.branch[stop], scales, lambda: unfused_output(x, shortcut)
            )

        if not blocked:
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


def _output_part(branch) -> int | None:
    """Where the block's output part starts: the index of its last pointwise Dense
    when it has no activation and only layer scales and stochastic depth (the
    identity at inference) follow it, so that `shortcut + scales * (x @ W + b)` is
    one product with the scales folded into W and b and the shortcut added by the
    product; None when the block ends otherwise."""
    denses = [i for i, layer in enumerate(branch) if isinstance(layer, PointwiseDense)]
    if not denses:
        return None
    last = denses[-1]
    if branch[last].activation not in (None, keras.activations.linear):
        return None
    after = branch[last + 1 :]
    return (
        last if all(isinstance(layer, (LayerScale, StochasticDepth)) for layer in after) else None
    )


class BlockParts(NamedTuple):
    """A block that is the plain inverted bottleneck: `dwconv` -> `norm` -> `expand`
    (a pointwise Dense with the exact GELU) (-> `response_norm`, V2's GRN) ->
    `project` (a pointwise Dense without activation) -> `scales` (its layer scales),
    with nothing else in the branch but stochastic depth after them (the identity at
    inference): what a backend may run as one sequence of kernels
    (`fast_ops.LayerKernels.whole`)."""

    dwconv: DepthwiseConv
    norm: keras.layers.Layer
    expand: PointwiseDense
    response_norm: GlobalResponseNorm | None
    project: PointwiseDense
    scales: tuple


def _block_parts(branch, output, output_scales) -> BlockParts | None:
    """`branch`'s `BlockParts`, or None when it is another shape (`output`: where its
    output part starts, `_output_part`)."""
    if output is None or output not in (3, 4):
        return None
    dwconv, norm, expand = branch[:3]
    response_norm = branch[3] if output == 4 else None
    if (
        type(dwconv) is not DepthwiseConv
        or type(expand) is not PointwiseDense
        or expand.activation is not exact_gelu
        or (output == 4 and type(response_norm) is not GlobalResponseNorm)
        or type(branch[output]) is not PointwiseDense
    ):
        return None
    return BlockParts(dwconv, norm, expand, response_norm, branch[output], output_scales)


def block_layers(
    width, kernel_size, prefix, drop_path, config: ConvNeXtConfig, dilation: int = 1
) -> Residual:
    """The layers of one ConvNeXt block (C = `width`):

    dwconv k x k (dilated by `dilation`) -> norm -> Dense (mlp_ratio C) -> activation
    (-> GRN, V2) -> Dense C (-> layer scale, V1) -> stochastic depth -> + shortcut.
    """
    branch = [
        DepthwiseConv(
            kernel_size,
            dilation_rate=dilation,
            use_bias=config.conv_bias,
            name=f"{prefix}_dwconv",
        ),
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


def convnext_block(x, width, kernel_size, prefix, drop_path, config: ConvNeXtConfig, dilation=1):
    """One ConvNeXt block applied to `x`: (B, H, W, C) -> (B, H, W, C), C = `width`."""
    return block_layers(width, kernel_size, prefix, drop_path, config, dilation)(x)


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

    `run(x, output_stages, apply, by_rows, head_apply, residual_dense, whole)` applies
    them in order to `x` (B, H, W, C) and returns the head's output, or the requested
    stages' feature maps (`apply`, `by_rows`, `residual_dense` and `whole`: see
    `Residual`; `head_apply`: how the head's layers are run, `apply` by default). Only the current
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

    def run(
        self,
        x,
        output_stages=None,
        apply=apply_layer,
        by_rows=None,
        head_apply=None,
        residual_dense=None,
        whole=None,
    ):
        def step_of(step, x):
            if isinstance(step, Residual):
                return step(x, apply, by_rows, residual_dense, whole)
            return apply(step, x)

        for step in self.stem:
            x = step_of(step, x)
        wanted = {} if output_stages is None else dict.fromkeys(output_stages)
        for index, stage in enumerate(self.stages):
            if output_stages is not None and index > max(output_stages):
                break
            for step in stage:
                x = step_of(step, x)
            if index in wanted:
                wanted[index] = x
        if output_stages is not None:
            return [wanted[s] for s in output_stages]
        for step in self.head:
            x = (head_apply or apply)(step, x)
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


def _drop_path_rates(depths, drop_path_rate):
    # a linear rise 0 -> drop_path_rate over all blocks, as timm
    total = sum(depths)
    return [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]


def _stage_steps(config: ConvNeXtConfig, layout: StageLayout, stage: int, rates) -> list:
    """Stage `stage`'s downsampling (norm + conv, where timm has one) and blocks."""
    width = config.widths[stage]
    first, dilation = layout.dilations[stage]
    steps = []
    if layout.has_downsample(stage, config.widths):
        steps.append(norm_layer(config.norm, config.norm_eps, f"stage{stage}_downsample_norm"))
        steps.append(
            downsample_conv(
                width,
                layout.downsample_kernel(stage),
                layout.strides[stage],
                f"stage{stage}_downsample_conv",
                config.conv_bias,
                dilation=first,
            )
        )
    kernel = config.kernel_sizes[stage]
    for block in range(config.depths[stage]):
        prefix = f"stage{stage}_block{block}"
        steps.append(block_layers(width, kernel, prefix, next(rates), config, dilation))
    return steps


def head_layers(config: ConvNeXtConfig, head: dict) -> list:
    """The one place the head is laid out: the layers (B, h, w, C) -> the output, for
    the head options `head` (num_classes, include_top, pooling, head_norm, gem_p,
    drop_rate, classifier_activation, normalize; see `ConvNeXt`)."""
    layers = []
    if config.head_norm_first:  # timm's forward_features ends with norm_pre
        layers.append(norm_layer(config.norm, config.norm_eps, "norm_pre"))
    if not head["include_top"]:
        if head["pooling"] is not None:
            layers.append(pooling_layer(head["pooling"], "head_pool", head["gem_p"]))
    else:
        layers.append(pooling_layer(head["pooling"] or "avg", "head_pool", head["gem_p"]))
        if head["head_norm"] and not config.head_norm_first:
            layers.append(norm_layer(config.norm, config.norm_eps, "head_norm"))
        if config.head_hidden_size:  # timm's NormMlpClassifierHead: Linear + GELU pre-logits
            layers.append(
                keras.layers.Dense(
                    config.head_hidden_size, activation=exact_gelu, name="head_pre_logits"
                )
            )
        if head["drop_rate"]:  # timm's head dropout (training only)
            layers.append(keras.layers.Dropout(head["drop_rate"], name="head_drop"))
        if head["num_classes"]:
            layers.append(
                keras.layers.Dense(
                    head["num_classes"], activation=head["classifier_activation"], name="head_fc"
                )
            )
    if head["normalize"]:
        layers.append(keras.layers.UnitNormalization(axis=-1, name="embedding_l2"))
    return layers


def build_layer_plan(
    config: ConvNeXtConfig, layout: StageLayout, head: dict, output_stages, drop_path_rate
) -> LayerPlan:
    """The `LayerPlan` of a ConvNeXt: `config`'s stem and stages under `layout`, then the
    head of `head` (none when `output_stages` asks for feature maps)."""
    rates = iter(_drop_path_rates(config.depths, float(drop_path_rate)))
    stages = [_stage_steps(config, layout, stage, rates) for stage in range(4)]
    # feature maps (timm's features_only) end at the stages, before norm_pre and the head
    if output_stages is not None:
        head = []
    else:
        with dtype_policy(head_dtype()):  # float32 after a bfloat16 body
            head = head_layers(config, head)
    return LayerPlan(_stem_layers(config, layout.stem_stride), stages, head)


def check_pooling(config: ConvNeXtConfig, pooling, include_top: bool, head_norm: bool) -> None:
    """timm's head cannot normalise a "catavgmax" pooling (twice the channels): refused."""
    if pooling == "catavgmax" and include_top and head_norm and not config.head_norm_first:
        raise ModelArgumentError(
            "pooling='catavgmax' doubles the pooled channels, which the head norm cannot take "
            "(timm refuses it too); use it with head_norm_first architectures, head_norm=False "
            "or include_top=False."
        )
