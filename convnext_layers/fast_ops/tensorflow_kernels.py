"""The TensorFlow kernels of `fast_ops` (see the package docstring for the guard):
Dense as the chain grappler fuses into `_FusedMatMul`, LayerNorm as the subgraph
it fuses into `_MklLayerNorm`, and `predict_batch`'s traced call.

tensorflow is imported inside each function: importing this module loads no backend.
"""

from __future__ import annotations

import keras
from keras import ops

from convnext_layers import fast_ops

# `tensorflow_layer_norm`'s dtypes: on (8, 56, 56, 40), 1 thread, keras' LayerNorm
# took 6.9 ms in float32 and 6.1 ms in bfloat16, this 2.3 and 1.6 ms
LAYER_NORM_DTYPES = ("float32", "bfloat16")

# kind -> (fast path, function of this module): what `fast_ops.run_kernel` runs
KERNELS = {"dense": ("tensorflow_fused_dense", "dense")}


def dense(x, layer, fuse_gelu):
    """`PointwiseDense`'s call on TensorFlow (`tensorflow_dense`; grappler fuses
    whichever activation, so `fuse_gelu` changes nothing here); in bfloat16
    without an activation, a 1x1 convolution (`tensorflow_pointwise_conv`)."""
    kernel = ops.cast(layer.kernel, x.dtype)
    bias = None if layer.bias is None else ops.cast(layer.bias, x.dtype)
    if (
        layer.activation in (None, keras.activations.linear)
        and len(x.shape) == 4
        and keras.backend.standardize_dtype(x.dtype) in POINTWISE_CONV_DTYPES
        and fast_ops.fast_paths_allowed("tensorflow_pointwise_conv")
    ):
        return fast_ops.guarded(
            "tensorflow_pointwise_conv",
            lambda: tensorflow_pointwise_conv(x, kernel, bias),
            lambda: tensorflow_dense(x, kernel, bias, None),
        )
    return tensorflow_dense(x, kernel, bias, layer.activation)


# `tensorflow_pointwise_conv`'s dtypes. TensorFlow's oneDNN MatMul runs oneDNN's
# plain gemm in every dtype; its Conv2D picks the AMX / AVX512-BF16 kernels in
# bfloat16. A V1 block's second Dense (no activation), 1 thread, bfloat16, matmul
# -> 1x1 conv: (8, 56, 56) 160 -> 40: 3.1 -> 1.8 ms; (8, 28, 28) 320 -> 80: 1.7 ->
# 1.1 ms; (8, 7, 7) 1280 -> 320: 1.2 -> 0.9 ms; (1, 56, 56) 160 -> 40: 0.6 -> 0.4
# ms. In float32 the two are the same (6.9 vs 7.1 ms on 40 -> 160); with the GELU
# the fused MatMul wins (the conv's GELU is five separate ops).
POINTWISE_CONV_DTYPES = ("bfloat16",)


def tensorflow_pointwise_conv(inputs, kernel, bias):
    """Dense without activation on (B, H, W, in) as a 1x1 Conv2D (+ BiasAdd, which
    grappler fuses into it): (B, H, W, in) -> (B, H, W, out)."""
    # tensorflow: on the tensorflow backend alone (importing this module loads no backend)
    import tensorflow as tf

    outputs = tf.nn.conv2d(inputs, tf.reshape(kernel, (1, 1, *kernel.shape)), 1, "VALID")
    return outputs if bias is None else tf.nn.bias_add(outputs, bias)


def layer_kernels(x):
    """`fast_ops.layer_kernels` on TensorFlow: `tensorflow_apply`."""
    if not fast_ops.use_fast_path("tensorflow_layer_norm", x):
        return None
    return fast_ops.LayerKernels("tensorflow_layer_norm", tensorflow_apply, None)


def tensorflow_dense(inputs, kernel, bias, activation):
    """Dense as a 2-D MatMul -> BiasAdd -> activation chain, which TensorFlow's graph
    optimizer rewrites into one oneDNN `_FusedMatMul` (keras' tensordot on the 4-D
    input leaves reshapes in between). (..., in) -> (..., out)."""
    # tensorflow: on the tensorflow backend alone (importing this module loads no backend)
    import tensorflow as tf

    units = kernel.shape[1]
    x = tf.matmul(tf.reshape(inputs, (-1, kernel.shape[0])), kernel)
    if bias is not None:
        x = tf.nn.bias_add(x, bias)
    if activation is not None:
        x = activation(x)
    outputs = tf.reshape(x, tf.concat([tf.shape(inputs)[:-1], [units]], axis=0))
    outputs.set_shape(inputs.shape[:-1] + [units])
    return outputs


def tensorflow_apply(layer, x):
    """`layer.call(x)` for layer-by-layer inference on TensorFlow, with keras'
    LayerNormalization as `tensorflow_layer_norm`."""
    if fast_ops.plain_layer_norm(layer, x, LAYER_NORM_DTYPES):
        return tensorflow_layer_norm(x, layer.gamma.value, layer.beta.value, layer.epsilon)
    return layer.call(x)


def tensorflow_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis, (..., C) -> (..., C), written as the subgraph
    that TensorFlow's graph optimizer (grappler's remapper, with oneDNN) rewrites
    into one `_MklLayerNorm` kernel: x as 2-D rows (R, C) -> reshaped (1, R, C, 1)
    -> FusedBatchNormV3 in training mode over NCHW (per "channel" = per row: its
    mean and biased variance), unit scale and zero offset made by Fill -> reshaped
    back -> * gamma + beta. keras' LayerNormalization on (32, 56, 56, 40) float32
    took 9.2 ms in a tf.function, this 1.4 ms (same numbers within 2e-6).

    The rewrite needs a 2-D input and the Fills left in the graph, i.e. a row count
    unknown when traced (constant folding turns the Fills of a static size into
    constants): `inference_function` traces with the batch size left open. Where
    the rewrite does not happen (eager, static sizes, no oneDNN) the same subgraph
    runs unfused and still computes LayerNorm. The raw op keeps `epsilon` as
    given (`tf.nn.fused_batch_norm` raises it to 1.001e-5)."""
    # tensorflow: on the tensorflow backend alone (importing this module loads no backend)
    import tensorflow as tf

    channels = x.shape[-1]
    rows = tf.reshape(x, [-1, channels])
    count = tf.shape(rows)[0]
    fill_shape = tf.reshape(count, [1])
    y = tf.reshape(rows, tf.stack([1, count, channels, 1]))
    # the statistics, unit scale and zero offset in float32 (FusedBatchNormV3's U:
    # bfloat16 inputs are normalised with float32 statistics)
    empty = tf.constant([], tf.float32)
    y = tf.raw_ops.FusedBatchNormV3(
        x=y,
        scale=tf.ones(fill_shape, tf.float32),
        offset=tf.zeros(fill_shape, tf.float32),
        mean=empty,
        variance=empty,
        epsilon=float(epsilon),
        data_format="NCHW",
        is_training=True,
    ).y
    y = tf.reshape(y, tf.shape(rows)) * gamma + beta
    outputs = tf.reshape(y, tf.shape(x))
    outputs.set_shape(x.shape)
    return outputs


def inference_function(model):
    """`fast_ops.inference_function` on TensorFlow: a `tf.function` of the call, one
    concrete function per image size and dtype, the batch size left open."""
    # tensorflow: on the tensorflow backend alone (importing this module loads no backend)
    import tensorflow as tf

    name = "float32_compute"
    plain = tf.function(lambda x: model(x, training=False), autograph=False)
    in_float32 = None
    if fast_ops.wants_float32_compute(model):
        run = fast_ops.guarded(name, lambda: float32_runner(model), lambda: None)
        in_float32 = None if run is None else tf.function(run, autograph=False)
    concrete = {}

    def traced(function, x):
        # the batch size is left open: one trace serves every batch size, and
        # grappler's LayerNorm rewrite needs it (`tensorflow_layer_norm`)
        key = (id(function), tuple(x.shape[1:]), str(x.dtype))
        if key not in concrete:
            spec = tf.TensorSpec((None, *x.shape[1:]), x.dtype)
            concrete[key] = function.get_concrete_function(spec)
        return concrete[key]

    def infer(x):
        x = tf.constant(x)
        if in_float32 is not None and fast_ops.wants_float32_compute(model):
            return fast_ops.guarded(
                name,
                lambda: fast_ops.to_numpy(traced(in_float32, x)(x)),
                lambda: fast_ops.to_numpy(traced(plain, x)(x)),
            )
        return fast_ops.to_numpy(traced(plain, x)(x))

    return infer


# "float32_compute": on a CPU without bfloat16 instructions TensorFlow's oneDNN
# kernels compute bfloat16 by converting to float32 and back around each op.
# predict_batch median ms, bfloat16 against float32 (Intel Xeon with AVX-512 but no
# AVX512_BF16, 2 CPUs): convnext_atto b1 44.2 / 27.6, b8 170.3 / 73.3; convnext_tiny
# b8 1162.6 / 335.5.
def float32_runner(model):
    """`run(x)`, traced by a `tf.function`: `model`, whose body is bfloat16, computed as
    its float32 twin (`fast_ops.float32_architecture`, variables never allocated) on
    the model's weights converted to float32 inside the graph, on every call (so
    weight updates are seen): the bfloat16 weights' numbers in float32 arithmetic.
    None where there is no twin."""
    # tensorflow: on the tensorflow backend alone (importing this module loads no backend)
    import tensorflow as tf

    twin = fast_ops.float32_architecture(model)
    if twin is None:
        return None
    variables, twin_variables = list(model.variables), list(twin.variables)

    def run(x):
        values = [tf.cast(v.value, tf.float32) for v in variables]
        mapping = list(zip(twin_variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return twin(x, training=False)

    return run
