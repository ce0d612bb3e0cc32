"""Time candidate formulations of a ConvNeXt block's operations on the current
KERAS_BACKEND (run once per backend, each in its own process):

    KERAS_BACKEND=jax python benchmarks/formulations.py --op dwconv --shape 32,56,56,96
    KERAS_BACKEND=jax python benchmarks/formulations.py --op gelu --shape 32,56,56,160

    KERAS_BACKEND=jax python benchmarks/formulations.py --op block --shape 32,56,56,96

--op: dwconv (7x7 depthwise), gelu (exact, erf), layernorm (over channels),
dense (1x1 conv C -> 4C as a matmul with bias), block (a whole V1 block, JAX only:
orders of computation that let XLA compute the depthwise sum once).

Each formulation is wrapped in a one-layer Keras model and timed through
`predict_on_batch` (the path the models run), each model applying the op --chain
times in a row (so that the NumPy I/O of predict_on_batch is amortised; times
are per application). The formulations take turns pass by pass (--repeats
rounds), so a shared machine's drifting load hits all alike; the median wall
time and the median CPU time of the process (all threads; steadier than wall
time when other jobs compete for the cores) are printed with the ratio to the
first formulation and the max abs difference to its output. The figures justify
the choices made per backend in
`convnext_layers` (DepthwiseConv.call and the private helpers below it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import keras
import numpy as np
from keras import ops

from convnext_layers.layers import depthwise_shifted_sum

BACKEND = keras.backend.backend()


def shifted_sum(x, kernel, bias):
    """49 shifted multiply-adds in keras.ops (the models' JAX path)."""
    return depthwise_shifted_sum(x, kernel, bias)


def keras_depthwise(x, kernel, bias):
    return ops.depthwise_conv(x, kernel, strides=1, padding="same") + bias


def gelu_formulations():
    def keras_gelu(x):
        return keras.activations.gelu(x, approximate=False)

    def erf_gelu(x):
        return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))

    table = {"keras_gelu": keras_gelu, "ops_erf_gelu": erf_gelu}
    if BACKEND == "tensorflow":
        import tensorflow as tf

        table["tf_erf_gelu"] = lambda x: 0.5 * x * (1.0 + tf.math.erf(x * 0.7071067811865476))
    if BACKEND == "jax":
        from jax import lax

        table["lax_erf_gelu"] = lambda x: 0.5 * x * (1.0 + lax.erf(x * 0.7071067811865476))
    if BACKEND == "torch":
        import torch.nn.functional as F

        table["torch_F_gelu"] = F.gelu
    return table


def layernorm_formulations():
    eps = 1e-6

    def keras_ln(x, gamma, beta):
        return ops.layer_normalization(x, gamma, beta, epsilon=eps)

    def two_pass(x, gamma, beta):
        mean = ops.mean(x, axis=-1, keepdims=True)
        xc = x - mean
        var = ops.mean(ops.square(xc), axis=-1, keepdims=True)
        return xc * (ops.rsqrt(var + eps) * gamma) + beta

    def one_pass(x, gamma, beta):
        mean = ops.mean(x, axis=-1, keepdims=True)
        var = ops.mean(ops.square(x), axis=-1, keepdims=True) - ops.square(mean)
        inv = ops.rsqrt(var + eps)
        return x * (inv * gamma) + (beta - mean * inv * gamma)

    table = {"keras_layer_normalization": keras_ln, "two_pass": two_pass, "one_pass": one_pass}
    if BACKEND == "torch":
        import torch.nn.functional as F

        table["torch_F_layer_norm"] = lambda x, g, b: F.layer_norm(x, (x.shape[-1],), g, b, eps)
    return table


def dense_formulations():
    def keras_dense(x, kernel, bias):
        return ops.matmul(x, kernel) + bias

    table = {"keras_matmul_add": keras_dense}
    if BACKEND == "torch":
        import torch.nn.functional as F

        table["torch_F_linear"] = lambda x, k, b: F.linear(x, k.t(), b)
        table["torch_addmm"] = lambda x, k, b: (
            __import__("torch")
            .addmm(b, x.reshape(-1, x.shape[-1]), k)
            .view(*x.shape[:-1], k.shape[1])
        )
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def tf_matmul_bias_add(x, k, b):
            y = tf.matmul(tf.reshape(x, (-1, x.shape[-1])), k)
            return tf.reshape(tf.nn.bias_add(y, b), (*x.shape[:-1], k.shape[1]))

        table["tf_matmul_bias_add_2d"] = tf_matmul_bias_add
    return table


def formulations():
    table = {"keras_depthwise_conv": keras_depthwise, "shifted_sum": shifted_sum}
    if BACKEND == "jax":
        import jax.numpy as jnp
        from jax import lax

        def lax_nhwc_hwio(x, kernel, bias):
            k, c = kernel.shape[0], kernel.shape[2]
            y = lax.conv_general_dilated(
                x,
                kernel.reshape(k, k, 1, c),
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
            return y + bias

        def lax_nchw_oihw(x, kernel, bias):
            c = kernel.shape[2]
            y = lax.conv_general_dilated(
                jnp.transpose(x, (0, 3, 1, 2)),
                jnp.transpose(kernel, (2, 3, 0, 1)),
                (1, 1),
                "SAME",
                dimension_numbers=("NCHW", "OIHW", "NCHW"),
                feature_group_count=c,
            )
            return jnp.transpose(y, (0, 2, 3, 1)) + bias

        def shifted_sum_rows(x, kernel, bias):
            # same sum, accumulated as 7 row partial sums (different fusion shape)
            k = kernel.shape[0]
            p = k // 2
            h, w = x.shape[1], x.shape[2]
            xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            out = None
            for i in range(k):
                rows = xp[:, i : i + h]
                for j in range(k):
                    term = rows[:, :, j : j + w, :] * kernel[i, j, :, 0]
                    out = term if out is None else out + term
            return out + bias

        def shifted_sum_pad_barrier(x, kernel, bias):
            # materialise the padded input first so the 49 reads are plain slices
            # (on XLA CPU the barrier is removed before fusion, so this measures
            # as the plain shifted sum; kept to show that)
            k = kernel.shape[0]
            p = k // 2
            h, w = x.shape[1], x.shape[2]
            xp = lax.optimization_barrier(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))))
            out = None
            for i in range(k):
                for j in range(k):
                    term = xp[:, i : i + h, j : j + w, :] * kernel[i, j, :, 0]
                    out = term if out is None else out + term
            return out + bias

        def shifted_sum_bias_first(x, kernel, bias):
            # bias as the accumulator's start, taps in row-major order
            k = kernel.shape[0]
            p = k // 2
            h, w = x.shape[1], x.shape[2]
            xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            out = bias
            for i in range(k):
                for j in range(k):
                    out = out + xp[:, i : i + h, j : j + w, :] * kernel[i, j, :, 0]
            return out

        table.update(
            shifted_sum_pad_barrier=shifted_sum_pad_barrier,
            shifted_sum_bias_first=shifted_sum_bias_first,
            lax_nhwc_hwio=lax_nhwc_hwio,
            lax_nchw_oihw=lax_nchw_oihw,
            shifted_sum_rows=shifted_sum_rows,
        )
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        def tf_depthwise(x, kernel, bias):
            return tf.nn.bias_add(tf.nn.depthwise_conv2d(x, kernel, (1, 1, 1, 1), "SAME"), bias)

        table.update(tf_nn_depthwise_conv2d=tf_depthwise)
    elif BACKEND == "torch":
        import torch.nn.functional as F

        def torch_channels_last_view(x, kernel, bias):
            # permute of a contiguous NHWC tensor = channels_last NCHW view: no copy
            k, c = kernel.shape[0], kernel.shape[2]
            w = kernel.permute(2, 3, 0, 1)  # (C, 1, k, k)
            y = F.conv2d(x.permute(0, 3, 1, 2), w, bias, padding=k // 2, groups=c)
            return y.permute(0, 2, 3, 1)

        def torch_nchw_contiguous(x, kernel, bias):
            k, c = kernel.shape[0], kernel.shape[2]
            w = kernel.permute(2, 3, 0, 1).contiguous()
            y = F.conv2d(x.permute(0, 3, 1, 2).contiguous(), w, bias, padding=k // 2, groups=c)
            return y.permute(0, 2, 3, 1).contiguous()

        table.update(
            torch_conv2d_channels_last_view=torch_channels_last_view,
            torch_conv2d_nchw_copy=torch_nchw_contiguous,
        )
    return table


def block_formulations():
    """A whole ConvNeXt V1 block on JAX (dwconv 7x7 -> LayerNorm -> Dense 4C + GELU ->
    Dense C -> layer scale -> + shortcut), in orders that give XLA different chances
    to compute the depthwise sum once (XLA fuses the 49-term sum into each consumer:
    keras' LayerNorm reads its input in three reductions and one elementwise pass)."""
    if BACKEND != "jax":
        return {}
    import jax
    import jax.numpy as jnp
    from jax import lax

    eps = 1e-6

    def mlp(y, w1, b1, w2, b2, ls):
        h = jnp.matmul(y, w1) + b1
        h = 0.5 * h * (1.0 + lax.erf(h * 0.7071067811865476))
        return (jnp.matmul(h, w2) + b2) * ls

    def keras_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        # what the model runs: shifted sum, keras' layer_normalization (moments)
        y = depthwise_shifted_sum(x, k, kb)
        y = ops.layer_normalization(y, g, bt, epsilon=eps)
        return x + mlp(y, w1, b1, w2, b2, ls)

    def ln_two_pass(y, g, bt):
        mean = jnp.mean(y, axis=-1, keepdims=True)
        yc = y - mean
        var = jnp.mean(yc * yc, axis=-1, keepdims=True)
        return yc * (lax.rsqrt(var + eps) * g) + bt

    def ln_one_pass(y, g, bt):
        # mean and mean of squares: one multi-output reduction over y
        mean = jnp.mean(y, axis=-1, keepdims=True)
        mean_sq = jnp.mean(y * y, axis=-1, keepdims=True)
        var = jnp.maximum(mean_sq - mean * mean, 0.0)
        inv = lax.rsqrt(var + eps) * g
        return y * inv + (bt - mean * inv)

    def two_pass_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        y = depthwise_shifted_sum(x, k, kb)
        return x + mlp(ln_two_pass(y, g, bt), w1, b1, w2, b2, ls)

    def one_pass_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        y = depthwise_shifted_sum(x, k, kb)
        return x + mlp(ln_one_pass(y, g, bt), w1, b1, w2, b2, ls)

    def barrier_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        # the depthwise output behind an optimization barrier: materialised once
        y = lax.optimization_barrier(depthwise_shifted_sum(x, k, kb))
        y = ops.layer_normalization(y, g, bt, epsilon=eps)
        return x + mlp(y, w1, b1, w2, b2, ls)

    def barrier_one_pass_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        y = lax.optimization_barrier(depthwise_shifted_sum(x, k, kb))
        return x + mlp(ln_one_pass(y, g, bt), w1, b1, w2, b2, ls)

    def folded_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        # LayerNorm's scale folded into the first matmul, which reads the depthwise
        # output itself (a dot is never fused with its producer, so it is
        # materialised once); the centring and 1/std are applied to the product
        y = depthwise_shifted_sum(x, k, kb)
        mean = jnp.mean(y, axis=-1, keepdims=True)
        var = jnp.maximum(jnp.mean(y * y, axis=-1, keepdims=True) - mean * mean, 0.0)
        inv = lax.rsqrt(var + eps)
        w1g = w1 * g[:, None]
        h = (jnp.matmul(y, w1g) - mean * (g @ w1)) * inv + (bt @ w1 + b1)
        h = 0.5 * h * (1.0 + lax.erf(h * 0.7071067811865476))
        return x + (jnp.matmul(h, w2) + b2) * ls

    def grouped_conv_block(x, k, kb, g, bt, w1, b1, w2, b2, ls):
        c = k.shape[2]
        y = lax.conv_general_dilated(
            x, k.reshape(7, 7, 1, c), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            precision=lax.Precision.DEFAULT,
        ) + kb  # fmt: skip
        y = ops.layer_normalization(y, g, bt, epsilon=eps)
        return x + mlp(y, w1, b1, w2, b2, ls)

    del jax
    return {
        "keras_block": keras_block,
        "two_pass_ln": two_pass_block,
        "one_pass_ln": one_pass_block,
        "barrier": barrier_block,
        "barrier_one_pass_ln": barrier_one_pass_block,
        "ln_folded_into_matmul": folded_block,
        "grouped_conv": grouped_conv_block,
    }


def _block_weights(c, rng):
    return [
        (rng.standard_normal((7, 7, c, 1)) / 7).astype("float32"),
        (0.1 * rng.standard_normal(c)).astype("float32"),
        (1 + 0.2 * rng.standard_normal(c)).astype("float32"),
        (0.2 * rng.standard_normal(c)).astype("float32"),
        (rng.standard_normal((c, 4 * c)) / c**0.5).astype("float32"),
        (0.1 * rng.standard_normal(4 * c)).astype("float32"),
        (rng.standard_normal((4 * c, c)) / (4 * c) ** 0.5).astype("float32"),
        (0.1 * rng.standard_normal(c)).astype("float32"),
        (0.5 * rng.standard_normal(c)).astype("float32"),
    ]


class Formulation(keras.layers.Layer):
    def __init__(self, fn, weights, chain, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn
        self.chain = chain
        self.ws = []
        for w in weights:
            v = self.add_weight(shape=w.shape, initializer="zeros", trainable=False)
            v.assign(w)
            self.ws.append(v)

    def call(self, x):
        ws = [ops.convert_to_tensor(w) for w in self.ws]
        for _ in range(self.chain):
            x = self.fn(x, *ws)
        return x


OPS = {
    "dwconv": (
        formulations,
        lambda c, rng: [
            (rng.standard_normal((7, 7, c, 1)) / 7).astype("float32"),
            rng.standard_normal(c).astype("float32"),
        ],
    ),
    "gelu": (gelu_formulations, lambda c, rng: []),
    "layernorm": (
        layernorm_formulations,
        lambda c, rng: [
            (1 + 0.2 * rng.standard_normal(c)).astype("float32"),
            (0.2 * rng.standard_normal(c)).astype("float32"),
        ],
    ),
    "block": (block_formulations, _block_weights),
    "dense": (
        dense_formulations,
        lambda c, rng: [  # C -> C so that it chains
            (rng.standard_normal((c, c)) / c**0.5).astype("float32"),
            (0.2 * rng.standard_normal(c)).astype("float32"),
        ],
    ),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--op", choices=sorted(OPS), default="dwconv")
    p.add_argument("--shape", default="32,56,56,96")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--chain",
        type=int,
        default=8,
        help="applications per model call (amortises predict_on_batch's I/O); "
        "times are per application",
    )
    p.add_argument("--only", default=None, help="comma-separated formulation names")
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    make_table, make_weights = OPS[args.op]
    weights = make_weights(shape[-1], rng)
    table = make_table()
    names = args.only.split(",") if args.only else list(table)
    models, outputs = {}, {}
    for name in names:
        inputs = keras.Input(shape[1:], batch_size=shape[0])
        models[name] = keras.Model(inputs, Formulation(table[name], weights, args.chain)(inputs))
        outputs[name] = models[name].predict_on_batch(x)
        models[name].predict_on_batch(x)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            w0, c0 = time.perf_counter(), time.process_time()
            models[name].predict_on_batch(x)
            wall[name].append((time.perf_counter() - w0) / args.chain)
            cpu[name].append((time.process_time() - c0) / args.chain)
    ref = names[0]
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{BACKEND:10s} {args.op:9s} {str(shape):18s} {name:32s} "
            f"wall {w * 1e3:7.1f} ms ({w / statistics.median(wall[ref]):.2f}x)  "
            f"cpu {c * 1e3:7.1f} ms ({c / statistics.median(cpu[ref]):.2f}x)  "
            f"maxdiff {np.abs(outputs[name] - outputs[ref]).max():.1e}  "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
