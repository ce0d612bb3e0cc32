"""The torch kernels of `fast_ops` (CPU inference; see the package docstring for the
guard): oneDNN's fused linear, convs on the channels_last view of NHWC tensors,
GRN's multiply-add as one addcmul, the layer-by-layer LayerNorm / Add, a V1
block's tail over row blocks, and `predict_batch`'s inference call (which tells
glibc's malloc to keep freed memory).

torch is imported inside each function: importing this module loads no backend.
"""

from __future__ import annotations

import functools

import keras

from convnext_layers import fast_ops

# kind -> (fast path, function of this module): what `fast_ops.run_kernel` runs
KERNELS = {
    "depthwise_conv": ("torch_conv_nhwc", "depthwise_conv"),
    "conv": ("torch_conv_nhwc", "conv"),
    "dense": ("onednn_linear", "dense"),
    "multiply_add": ("torch_addcmul", "torch_multiply_add"),
    "response_norm": ("torch_grn_bfloat16", "response_norm"),
}

# `torch_grn_bfloat16`'s dtypes: in float32 the portable GRN's cast is free and its
# sum of squares measured faster than `vector_norm` (see `GlobalResponseNorm`)
RESPONSE_NORM_DTYPES = ("bfloat16",)
# `torch_residual_dense`'s dtypes: measured faster than the three ops in both
# (`residual_dense`)
RESIDUAL_DENSE_DTYPES = ("float32", "bfloat16")


def torch_value(variable, dtype):
    """A keras variable's torch tensor in `dtype` (None: as stored), without keras' op
    dispatch (`fast_ops.stored_values`)."""
    (value,) = fast_ops.stored_values((variable,))
    return value if dtype is None or value.dtype == dtype else value.to(dtype)


def torch_prepared(layer, variable, dtype, prepare):
    """`prepare(torch_value(variable, dtype))`, cached on `layer` while the variable's
    tensor is the same object, unmodified (torch's version counter, which every
    in-place update such as `variable.assign` bumps), for inference only: with
    gradients the preparation is redone each call so it stays in the graph.

    For weights torch wants in another layout (a conv kernel made contiguous in
    torch's (O, I, kh, kw) order): redoing that copy every call was ~45 us of a
    7x7 depthwise conv's ~85 us on an 8x8x40 input (1 thread)."""
    return torch_prepared_from(layer, (variable,), dtype, prepare)


def torch_prepared_from(layer, variables, dtype, prepare, variant=None):
    """`prepare(*values)` (a tensor or a tuple of them) of several variables' tensors
    in `dtype` (None: as stored, so that `prepare` alone converts), cached on `layer`
    while every variable's stored tensor is the same object, unmodified (so the
    conversion and preparation run once per weight update); `variant` tells apart
    preparations of the same variables (the dtype a `prepare` converts to)."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    stored = fast_ops.stored_values(variables)

    def prepared_now():
        values = stored
        if dtype is not None:
            values = tuple(v if v.dtype == dtype else v.to(dtype) for v in stored)
        return prepare(*values)

    if torch.is_grad_enabled() and any(value.requires_grad for value in stored):
        return prepared_now()
    cache = layer.__dict__.get("_convnext_torch_prepared")
    if cache is None:
        cache = {}
        object.__setattr__(layer, "_convnext_torch_prepared", cache)
    key = (tuple(id(variable) for variable in variables), dtype, variant)
    versions = tuple(value._version for value in stored)
    entry = cache.get(key)
    if (
        entry is None
        or any(a is not b for a, b in zip(entry[0], stored, strict=True))
        or entry[1] != versions
    ):
        prepared = prepared_now()
        if isinstance(prepared, tuple):
            prepared = tuple(None if t is None else t.detach() for t in prepared)
        else:
            prepared = prepared.detach()
        entry = cache[key] = (stored, versions, prepared)
    return entry[2]


# keras' LayerNormalization on a bfloat16 tensor casts it to float32, normalises and
# casts back: two float32 copies of the tensor. `F.layer_norm` on the bfloat16 tensor
# with float32 scale and offset computes in float32 inside its kernel and writes
# bfloat16 (the same numbers within one final rounding). Measured, median of 40, 2
# threads, ms, keras -> this: (8, 56, 56, 96) 1.50-1.54 -> 1.34-1.71, (32, 56, 56,
# 96) 24.7-28.1 -> 4.9-6.8, (8, 28, 28, 192) 0.68-0.72 -> 0.49-0.65, (32, 28, 28, 80)
# 1.31 -> 1.23-1.50; slower on 40 channels, (8, 56, 56, 40) 0.85-1.11 -> 1.44-1.95,
# so from this width on only.
BFLOAT16_LAYER_NORM_FROM_WIDTH = 64


def _torch_layer_norm(layer, x):
    """keras' LayerNormalization over the last axis of `x` (float32 or bfloat16), its
    scale and offset in float32 converted once per weight update (keras converts them
    on every call: at batch 1 in bfloat16 the conversions were ~0.3 ms of a ~19 ms
    convnextv2_atto pass). In bfloat16 from `BFLOAT16_LAYER_NORM_FROM_WIDTH` channels
    on, the bfloat16 tensor goes in as it is; below, keras' own recipe (a float32 copy
    normalised, cast back), the same numbers without keras' op dispatch."""
    gamma, beta = torch_prepared_from(layer, (layer.gamma, layer.beta), None, _float32_pair)
    return torch_layer_norm(x, gamma, beta, layer.epsilon)


def _float32_pair(a, b):
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return a.to(torch.float32), b.to(torch.float32)


def torch_layer_norm(x, gamma, beta, epsilon):
    """LayerNorm over the last axis of `x` (float32 or bfloat16) with float32 `gamma`
    and `beta` as `_torch_layer_norm` computes it."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch
    import torch.nn.functional as F

    if x.dtype == torch.bfloat16 and x.shape[-1] < BFLOAT16_LAYER_NORM_FROM_WIDTH:
        y = F.layer_norm(x.to(torch.float32), (x.shape[-1],), gamma, beta, epsilon)
        return y.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), gamma, beta, epsilon)


def _runs_layer_norm(layer, x) -> bool:
    """`_torch_layer_norm` computes `layer` on `x`: keras' LayerNormalization over the
    last axis, in float32 or bfloat16."""
    return fast_ops.plain_layer_norm(layer, x, ("float32", "bfloat16"))


def torch_apply(layer, x):
    """`layer.call(x)` for layer-by-layer inference on torch, with keras' own
    LayerNormalization and Add computed straight in torch (the same kernels keras
    calls: `F.layer_norm`, `torch.add`) without keras' op dispatch, measured at
    ~37 vs ~6 us and ~9 vs ~2 us per call on an 8x8x40 input (1 thread); a bfloat16
    LayerNormalization from `BFLOAT16_LAYER_NORM_FROM_WIDTH` channels on without its
    float32 copies (`_torch_layer_norm`)."""
    kind = type(layer)
    if kind is keras.layers.Add and len(x) == 2:
        return x[0] + x[1]
    if _runs_layer_norm(layer, x):
        return _torch_layer_norm(layer, x)
    return layer.call(x)


def torch_by_row_blocks(tail, x, shortcut, width):
    """`jax_by_row_blocks` for eager torch without autograd: the blocks one after
    another, each written into one output tensor; guarded ("torch_row_blocks")
    with the tail in one piece as its fallback."""

    def blocked():
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        blocks = fast_ops.row_blocks(rows, width)
        if blocks is None:
            return tail(x, shortcut)
        size = blocks[1]
        flat = [a.reshape(rows, a.shape[-1]) for a in (x, shortcut)]
        out = None
        for start in range(0, rows, size):
            part = tail(*(fast_ops._as_images(a[start : start + size]) for a in flat))
            part = part.reshape(-1, part.shape[-1])
            if out is None:
                out = part.new_empty((rows, part.shape[-1]))
            out[start : start + part.shape[0]] = part
        return out.reshape(*shortcut.shape[:-1], out.shape[-1])

    return fast_ops.guarded("torch_row_blocks", blocked, lambda: tail(x, shortcut))


def _torch_row_runner(x):
    """`torch_by_row_blocks` where it may run on `x`: float32, no autograd."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    return torch_by_row_blocks if fast_ops.fast_paths_allowed("torch_row_blocks") else None


def _onednn_linear_pointwise(x, weight, bias, attr, scalars, algorithm):
    """The private oneDNN op (the one place it is called)."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, algorithm)


def _onednn_linear_usable(x, weight) -> bool:
    """oneDNN's fused linear replaces F.linear only for CPU inference in float32 /
    bfloat16 (the op has no autograd formula and was measured on CPU only)."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    if not fast_ops.use_fast_path("onednn_linear", x):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear_add(x, other, weight, bias):
    """The private oneDNN op with an added tensor (the one place it is called):
    x @ weight.T + bias + other, one product whose output pass adds `other`."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return torch.ops.mkldnn._linear_pointwise.binary(x, other, weight, bias, "add")


def torch_linear(x, weight, bias, fuse_gelu: bool):
    """(x @ weight.T + bias), then the exact GELU if `fuse_gelu`: (..., in) -> (..., out).

    Returns (output, gelu_applied): the caller applies its activation itself when
    the fused op was not used.
    """
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch.nn.functional as F

    if _onednn_linear_usable(x, weight):
        if fuse_gelu:  # "none": the erf GELU, not the tanh approximation

            def fast():
                return _onednn_linear_pointwise(x, weight, bias, "gelu", [], "none"), True

            def fallback():
                return F.gelu(F.linear(x, weight, bias)), True

        else:

            def fast():
                return _onednn_linear_pointwise(x, weight, bias, "none", [], ""), False

            def fallback():
                return F.linear(x, weight, bias), False

        return fast_ops.guarded("onednn_linear", fast, fallback)
    return F.linear(x, weight, bias), False


def torch_conv2d_nhwc(x, weight, bias, **conv_arguments):
    """torch's conv2d on an NHWC tensor without layout copies: (B, H, W, C) in,
    (B, H', W', O) out; `weight` in torch's (O, C / groups, kh, kw) layout.

    x.permute(0, 3, 1, 2) of a contiguous NHWC tensor is a channels_last NCHW
    view (no copy); conv2d keeps that memory format, so permuting back is again
    a view of a contiguous NHWC result.
    """
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch.nn.functional as F

    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, **conv_arguments)
    return y.permute(0, 2, 3, 1)


def torch_conv_weight_channels_last(kernel):
    """keras' (kh, kw, I, O) conv kernel as torch's (O, I, kh, kw), channels_last."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def torch_multiply_add(x, scale, bias):
    """x * scale + bias with broadcasting, in one pass (addcmul)."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return torch.addcmul(bias, x, scale)


# ----------------------------------------------------------------------------
# The layers' kernels (`KERNELS`), called as kernel(x, layer)
# ----------------------------------------------------------------------------


def depthwise_conv(x, layer):
    """`DepthwiseConv`'s call on torch: F.conv2d(groups=C) on the channels_last view
    of the NHWC input, its (k, k, C, 1) kernel as (C, 1, k, k) made contiguous once
    per weight update."""
    weight = torch_prepared(layer, layer.kernel, x.dtype, _depthwise_weight)
    bias = torch_value(layer.bias, x.dtype) if layer.use_bias else None
    k, channels = weight.shape[2], weight.shape[0]
    outputs = torch_conv2d_nhwc(x, weight, bias, padding=k // 2, groups=channels)
    return outputs if layer.activation is None else layer.activation(outputs)


def _depthwise_weight(kernel):
    """keras' (k, k, C, 1) depthwise kernel as torch's (C, 1, k, k), contiguous."""
    return kernel.permute(2, 3, 0, 1).contiguous()


def conv(x, layer):
    """`DownsampleConv`'s call on torch: F.conv2d on the channels_last view, the
    (k, k, I, O) kernel as (O, I, k, k) laid out channels_last as the input is."""
    kernel = torch_prepared(layer, layer.kernel, x.dtype, torch_conv_weight_channels_last)
    bias = torch_value(layer.bias, x.dtype) if layer.use_bias else None
    outputs = torch_conv2d_nhwc(
        x, kernel, bias, stride=layer.strides, padding=layer.explicit_padding
    )
    return outputs if layer.activation is None else layer.activation(outputs)


def dense(x, layer, fuse_gelu):
    """`PointwiseDense`'s call on torch: oneDNN's fused linear (+ the exact GELU when
    `fuse_gelu`, the layer's activation being it) where it may run, else F.linear."""
    kernel = torch_value(layer.kernel, x.dtype)
    bias = None if layer.bias is None else torch_value(layer.bias, x.dtype)
    # kernel (in, out) -> weight (out, in): a transposed view, no copy
    y, fused = torch_linear(x, kernel.t(), bias, fuse_gelu=fuse_gelu)
    return y if fused or layer.activation is None else layer.activation(y)


def _folded_output_weights(kernel, bias, *gammas):
    """(weight (out, in), bias (out,)) of `x @ kernel + bias` (no bias: zeros)
    followed by `* gamma` for each gamma (out,), folded in float32 and rounded to the
    kernel's dtype once."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    scale = torch.ones(kernel.shape[-1], dtype=torch.float32, device=kernel.device)
    for gamma in gammas:
        scale = scale * gamma.to(torch.float32)
    weight = (kernel.to(torch.float32) * scale).t().contiguous().to(kernel.dtype)
    folded_bias = torch.zeros_like(scale) if bias is None else bias.to(torch.float32) * scale
    return weight, folded_bias.to(kernel.dtype)


def residual_dense(x, shortcut, dense, scales, unfused):
    """A ConvNeXt block's output part, `shortcut + gammas * (x @ kernel + bias)`
    ((..., in), (..., out) -> (..., out)), as one oneDNN product whose output pass
    adds the shortcut, the layer scales folded into the weight and bias (cached per
    weight update, `torch_prepared_from`); guarded ("torch_residual_dense") with
    `unfused()`, the Dense, the scales and the add one by one, as its fallback.

    Measured one op against the three on a 2-core x86-64 with AMX, 2 threads, min of
    40: (8, 56, 56, 160) -> 40 in bfloat16 0.97 -> 0.55 ms, (32, 14, 14, 640) -> 160
    1.76 -> 1.43 ms; in float32 3.24 -> 2.90 and 10.1 -> 9.2 ms. The fold rounds the
    weights once, the unfused path rounds the product, the scaled product and the
    sum: in bfloat16 the fused result was the closer to float64 (max error 0.035
    against 0.047)."""
    variables = (dense.kernel, *(() if dense.bias is None else (dense.bias,)), *scales)

    def fused():
        def fold(kernel, *rest):
            bias = rest[0] if dense.bias is not None else None
            gammas = rest[1:] if dense.bias is not None else rest
            return _folded_output_weights(kernel, bias, *gammas)

        weight, bias = torch_prepared_from(dense, variables, x.dtype, fold)
        return _onednn_linear_add(x, shortcut, weight, bias)

    return fast_ops.guarded("torch_residual_dense", fused, unfused)


def _residual_dense_runner(x):
    """`residual_dense` where it may run on `x`: CPU inference without autograd, in
    `RESIDUAL_DENSE_DTYPES`, with oneDNN's linear-with-add op present."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    if (
        torch.is_grad_enabled()
        or keras.backend.standardize_dtype(x.dtype) not in RESIDUAL_DENSE_DTYPES
        or not fast_ops.use_fast_path("torch_residual_dense", x)
        or not torch.backends.mkldnn.is_available()
        or not hasattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "binary")
    ):
        return None
    return _checked_residual_dense


def _checked_residual_dense(x, shortcut, dense, scales, unfused):
    # switched off by a failure earlier in this pass; the fused op adds a tensor of the
    # product's own shape and dtype only
    if (
        not fast_ops.fast_paths_allowed("torch_residual_dense")
        or shortcut.dtype != x.dtype
        or tuple(shortcut.shape) != (*x.shape[:-1], dense.units)
    ):
        return unfused()
    return residual_dense(x, shortcut, dense, scales, unfused)


def torch_response_norm(x, weight, bias, epsilon):
    """ConvNeXt V2's GRN on a bfloat16 (B, H, W, C) tensor without a float32 copy of it:
    the L2 norm over (H, W) from the squares in bfloat16 summed by a batched product
    with a row of ones ((B, 1, H*W) @ (B, H*W, C): float32 accumulation, one rounding
    to bfloat16), the per-(sample, channel) factor `1 + weight * Nx` in float32, then
    one bfloat16 `addcmul` with the factor and bias rounded to bfloat16.

    The portable GRN casts the tensor to float32, squares it, multiplies and adds in
    float32 and casts back. convnextv2_atto in bfloat16, `predict_batch`, one process
    alternating the two 8 times: batch 8 69.5 -> 62.9 ms, batch 32 323 -> 283 ms
    (embeddings within cosine 0.999997). The norm was first `vector_norm(dtype=
    float32)`, then `sum(squares, dtype=float32)`: both copy the tensor to float32
    first (on (32, 56, 56, 160) 34.5 and 24.6 ms, this product 3.1 ms, median of 30, 2
    threads; a bfloat16 `sum` 2.9 ms, but it rounds partial sums to bfloat16). In the
    whole pass, alternating, median of 12 / 6: batch 8 90.4 -> 78.4 ms, batch 32 293
    -> 231 ms."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    batch, height, width, channels = x.shape
    ones = x.new_ones((batch, 1, height * width))
    squares = torch.square(x)
    sums = torch.bmm(ones, squares.reshape(batch, height * width, channels))
    # the small (B, 1, 1, C) steps in place, and no conversion of what is already in
    # its dtype: at batch 1 each op is a few microseconds of dispatch, 12 GRNs a pass
    gx = sums.reshape(batch, 1, 1, channels).to(torch.float32).sqrt_()
    nx = gx.div_(gx.mean(dim=-1, keepdim=True).add_(epsilon))
    scale = nx.mul_(weight if weight.dtype == torch.float32 else weight.to(torch.float32))
    scale = scale.add_(1.0).to(x.dtype)
    bias = bias if bias.dtype == x.dtype else bias.to(x.dtype)
    # the squares are this function's own and spent: the output reuses them (one tensor
    # of x's size fewer per call; convnextv2_atto bf16 batch 8 69.3 -> 66.4 and 74.9 ->
    # 68.9 ms, alternating, median of 16)
    return torch.addcmul(bias, x, scale, out=squares)


def response_norm(x, layer):
    """`GlobalResponseNorm`'s call on torch: `torch_response_norm` for inference in
    `RESPONSE_NORM_DTYPES`; the layer's portable GRN in other dtypes and with gradients
    (the fast path was measured for bfloat16 inference only)."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    weight, bias = layer.weight.value, layer.bias.value
    if keras.backend.standardize_dtype(x.dtype) not in RESPONSE_NORM_DTYPES or (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    ):
        return layer._response_norm(x)
    # in the dtypes `torch_response_norm` computes them in, once per weight update
    weight, bias = torch_prepared_from(
        layer,
        (layer.weight, layer.bias),
        None,
        lambda w, b: (w.to(torch.float32), b.to(x.dtype)),
        variant=x.dtype,
    )
    return torch_response_norm(x, weight, bias, layer.epsilon)


# ----------------------------------------------------------------------------
# A whole block at once
# ----------------------------------------------------------------------------

# What a block run at once stands for, kernel by kernel: where any of these is off, the
# block runs layer by layer (where each layer then asks for its own).
WHOLE_BLOCK_FAST_PATHS = (
    "torch_kernels",
    "torch_conv_nhwc",
    "onednn_linear",
    "torch_residual_dense",
)
# and what it asks for itself on the way, as the layers would
WHOLE_BLOCK_ALSO_USES = ("torch_row_blocks", "torch_grn_bfloat16", "stored_values")


def whole_block(parts, x, layers, blocked):
    """A block that is the plain inverted bottleneck (`plan.BlockParts`) on `x`
    (B, H, W, C) -> (B, H, W, C), as the layer-by-layer inference computes it (the
    same kernels, in the same order, on the same weights: the same numbers), with the
    per-layer work done once: its weights read and prepared once per weight update
    (one `torch_prepared_from` for the block), and what each layer checks on every
    call (its fast path, its device, its dtype) checked once per block or once per
    model. `layers()`: the block layer by layer, where a part of it may not run so
    (LoRA on a Dense, one of `WHOLE_BLOCK_FAST_PATHS` off, a tail `by_rows` would
    split: `blocked`).

    If it raises, the block runs layer by layer, where each layer's own guard finds
    the failing kernel and switches its fast path off (after which blocks run layer
    by layer); if none of the fast paths it runs is off then, the block's own code
    failed and "torch_whole_block" is switched off (`fast_ops.guarded`'s rule
    otherwise).

    What it saves is Python: convnextv2_atto in bfloat16 at batch 1 spent ~3 ms of an
    ~11.6 ms pass outside torch's ops, about 220 us a block, where timm spent ~1.4 ms
    of 12.6 (2-core AMD EPYC, torch profiler). One block on a 2 x 2 input, 427 -> 283
    us; whole passes at batch 1, alternating in one process with this and
    `stored_values` switched off (the layer path, old) and on, median of 40, old / new:
    convnext_atto 1.18x (bfloat16) and 1.14x (float32), convnextv2_atto 1.19x and
    1.10x, convnext_tiny 1.06x and 1.07x; at batch 8 1.02-1.08x."""
    if (
        parts.expand.lora_enabled
        or parts.project.lora_enabled
        # the environment, `portable()` and the device: asked once per pass
        # (`_whole_block_runner`); a fast path switched off since, here
        or fast_ops.any_disabled(("torch_whole_block", *WHOLE_BLOCK_FAST_PATHS))
    ):
        return layers()
    try:
        rows = x.shape[0] * x.shape[1] * x.shape[2]
        if blocked and fast_ops.row_blocks(rows, parts.expand.units) is not None:
            return layers()
        program = _whole_block_program(parts, x)
        return layers() if program is None else program(x)
    except Exception as error:
        result = layers()  # bad input raises here, and the fast paths stay on
        if not fast_ops.any_disabled(WHOLE_BLOCK_FAST_PATHS + WHOLE_BLOCK_ALSO_USES):
            # with packed weights, those are what the layers did not have
            packed = _packs_weights(x)
            fast_ops._disable("torch_packed_weights" if packed else "torch_whole_block", error)
        return result


# `torch_packed_weights`: in bfloat16 a whole block's two products read weights that
# oneDNN laid out once per weight update (`_reorder_linear_weight`, what inductor's
# weight prepacking calls) instead of laying them out anew on every call. The same
# numbers: equal bit for bit to the plain weights' on every row count tried (1 to
# 25088, either product, any packing hint). On a 2-core AMD EPYC (AVX512-BF16),
# median of 5 x 20, the first product with its GELU, plain -> packed ms:
#   convnext_tiny batch 1: (3136, 96) 0.94 -> 0.80; (784, 192) 0.77 -> 0.66;
#   (196, 384) 0.67 -> 0.60; (49, 768) 0.77 -> 0.60; batch 8 (25088, 96) 8.19 -> 7.23
#   convnext_atto batch 1: (3136, 40) 0.220 -> 0.216; (49, 320) 0.151 -> 0.134;
#   batch 8 (25088, 40) 1.89 -> 1.84; (392, 320) 0.87 -> 0.83
# In float32 it was slower on some shapes ((25088, 96) 21.7 -> 23.6 ms) and not bit
# equal on others: not used there.
PACKED_WEIGHT_DTYPES = ("bfloat16",)


def _packs_weights(x) -> bool:
    """A whole block on `x` reads packed weights (`torch_packed_weights`)."""
    return keras.backend.standardize_dtype(
        x.dtype
    ) in PACKED_WEIGHT_DTYPES and fast_ops.fast_paths_allowed("torch_packed_weights")


def _packed_linear_weight(weight, rows):
    """oneDNN's private weight packing (the one place it is called): `weight` (out,
    in) laid out for products of about `rows` rows, as an opaque oneDNN tensor that
    only `_onednn_linear_pointwise` / `_onednn_linear_add` read."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def _packed_or_plain(weight, rows):
    """`weight` packed (`_packed_linear_weight`), or as it is where packing fails (and
    `torch_packed_weights` is switched off)."""
    return fast_ops.guarded(
        "torch_packed_weights", lambda: _packed_linear_weight(weight, rows), lambda: weight
    )


def _whole_block_program(parts, x):
    """`parts`' block as one function of its input, for `x`'s dtype (kept on the
    block's depthwise conv, one per dtype), or None where its layers are not what
    the function computes: the depthwise conv's fast shape without activation,
    keras' plain LayerNormalization, and Dense layers whose product oneDNN fuses."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    dwconv, norm, expand, grn, project, scales = parts
    programs = dwconv.__dict__.get("_convnext_torch_whole_block")
    if programs is None:
        programs = {}
        object.__setattr__(dwconv, "_convnext_torch_whole_block", programs)
    if x.dtype in programs:
        return programs[x.dtype]
    dtype = x.dtype
    channels = dwconv.kernel.shape[2]
    # the dtype and oneDNN's ops: checked per pass (`_whole_block_runner`)
    usable = (
        dwconv._fast_path_shape()
        and dwconv.activation in (None, keras.activations.linear)
        and _runs_layer_norm(norm, x)
        and project.units == channels
    )
    if not usable:
        programs[dtype] = None
        return None
    size = dwconv.kernel_size[0]
    variables = [dwconv.kernel, *([dwconv.bias] if dwconv.use_bias else [])]
    variables += [norm.gamma, norm.beta, expand.kernel]
    variables += [expand.bias] if expand.bias is not None else []
    variables += [grn.weight, grn.bias] if grn is not None else []
    variables += [project.kernel, *([project.bias] if project.bias is not None else [])]
    variables += [scale.gamma for scale in scales]
    variables = tuple(variables)

    def prepare(*stored):
        values = iter(stored)
        conv = _depthwise_weight(next(values).to(dtype))
        conv_bias = next(values).to(dtype) if dwconv.use_bias else None
        gamma, beta = _float32_pair(next(values), next(values))
        expand_weight = next(values).to(dtype).t()  # (in, out) -> (out, in): a view
        expand_bias = next(values).to(dtype) if expand.bias is not None else None
        grn_weight = grn_bias = None
        if grn is not None:
            grn_weight, grn_bias = next(values).to(torch.float32), next(values).to(dtype)
        kernel = next(values).to(dtype)
        bias = next(values).to(dtype) if project.bias is not None else None
        output = _folded_output_weights(kernel, bias, *(next(values).to(dtype) for _ in scales))
        return (conv, conv_bias, gamma, beta, expand_weight, expand_bias, grn_weight, grn_bias,
                *output)  # fmt: skip

    def packed_prepare(rows):
        def prepare_packed(*stored):
            prepared = list(prepare(*stored))
            for index in (4, 8):  # the two products' weights
                prepared[index] = _packed_or_plain(prepared[index], rows)
            return tuple(prepared)

        return prepare_packed

    def program(x):
        if _packs_weights(x):
            rows = x.shape[0] * x.shape[1] * x.shape[2]
            prepared = torch_prepared_from(
                dwconv, variables, None, packed_prepare(rows), variant=("packed_block", dtype)
            )
        else:
            prepared = torch_prepared_from(
                dwconv, variables, None, prepare, variant=("whole_block", dtype)
            )
        conv, conv_bias, gamma, beta, w1, b1, grn_weight, grn_bias, w2, b2 = prepared
        y = torch_conv2d_nhwc(x, conv, conv_bias, padding=size // 2, groups=channels)
        y = torch_layer_norm(y, gamma, beta, norm.epsilon)
        y = _onednn_linear_pointwise(y, w1, b1, "gelu", [], "none")
        if grn is not None:
            if _runs_response_norm(y):
                y = torch_response_norm(y, grn_weight, grn_bias, grn.epsilon)
            else:
                y = grn.call(y)
        return _onednn_linear_add(y, x, w2, b2)

    programs[dtype] = program
    return program


def _runs_response_norm(x) -> bool:
    """`response_norm` would run `torch_response_norm` on `x` (no autograd)."""
    return keras.backend.standardize_dtype(
        x.dtype
    ) in RESPONSE_NORM_DTYPES and fast_ops.use_fast_path("torch_grn_bfloat16", x)


def _whole_block_runner(x):
    """`whole_block` where it may run on `x`: where `residual_dense` may
    (`_residual_dense_runner`: CPU inference without autograd, float32 or bfloat16,
    oneDNN's linear-with-add op present) and this fast path is on."""
    if _residual_dense_runner(x) is None or not fast_ops.use_fast_path("torch_whole_block", x):
        return None
    return whole_block


def layer_kernels(x):
    """`fast_ops.layer_kernels` on torch: `torch_apply`, `torch_by_row_blocks`
    without autograd in float32, `residual_dense` and `whole_block` without autograd
    in float32 and bfloat16."""
    if not fast_ops.use_fast_path("torch_kernels", x):
        return None
    return fast_ops.LayerKernels(
        "torch_kernels",
        torch_apply,
        _torch_row_runner(x),
        _residual_dense_runner(x),
        _whole_block_runner(x),
    )


# `torch_keep_freed_memory`: PyTorch's CPU tensors come from glibc's malloc, which
# hands large freed blocks back to the kernel (`convnext_common.allocator`), so each
# pass at batch 8 and more page-faults its large tensors in again. With both
# thresholds raised, `predict_batch`, each setting in a fresh process (3 warm-up, 8
# timed passes, median; minor faults from getrusage; 2-core AMD EPYC):
#   convnextv2_atto float32, batch 32:  112,916-121,479 faults/pass 407-433 ms -> 1, 301-306 ms
#   convnext_tiny bfloat16, batch 32:   139,792 faults/pass 986 ms -> 2, 868 ms
#   convnext_atto bfloat16, batch 8:    63 faults/pass 38.2 ms -> 1, 38.3 ms
# (JAX's large buffers need more than the thresholds: `jax_kernels.heap_sized`.)
def inference_function(model):
    """`fast_ops.inference_function` on torch: the eager call under
    `torch.inference_mode()`, glibc's malloc told to keep freed memory at its
    first call on a CPU (`fast_ops.keep_freed_memory`, `torch_keep_freed_memory`); a
    model whose body is bfloat16, on a CPU without bfloat16 instructions, as its
    float32 twin (`float32_runner`, "float32_compute")."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    name = "float32_compute"
    runners = []  # the float32 twin's runner (None: none), made at the first call it may run

    def call(x):
        if fast_ops.wants_float32_compute(model, x):
            if not runners:
                runners.append(fast_ops.guarded(name, lambda: float32_runner(model), lambda: None))
            if runners[0] is not None:
                plain = functools.partial(model, x, training=False)
                return fast_ops.guarded(name, lambda: runners[0](x), plain)
        return model(x, training=False)

    def infer(x):
        with torch.inference_mode(), fast_ops.inference_pass():
            x = keras.ops.convert_to_tensor(x)
            fast_ops.keep_freed_memory("torch_keep_freed_memory", x)
            return fast_ops.to_numpy(call(x))

    return infer


# "float32_compute": on a CPU without bfloat16 instructions torch computes a bfloat16
# tensor's products and elementwise ops by converting to float32 and back around
# each. predict_batch median ms, bfloat16 against float32 (Intel Xeon with AVX-512 but
# no AVX512_BF16, 2 CPUs): convnext_atto b1 32.6 / 15.6, b8 177.8 / 77.3;
# convnext_tiny b8 1129.8 / 413.2.
def float32_runner(model):
    """`run(x)`: `model`, whose body is bfloat16, computed as its float32 twin: a float32
    copy of its architecture (`fast_ops.float32_copy`) whose weights are the model's
    converted to float32, copied again once per update of the model's weights
    (`torch_prepared_from`, cached on the model): the bfloat16 weights' numbers in
    float32 arithmetic, with every float32 kernel. None where there is no twin."""
    # torch: on the torch backend alone (importing this module loads no backend)
    import torch

    # made and updated outside inference mode: an inference tensor has no version
    # counter, which the twin's own prepared weights (`torch_prepared_from`) read
    with torch.inference_mode(False):
        twin = fast_ops.float32_copy(model)
    if twin is None:
        return None
    variables, twin_variables = list(model.variables), list(twin.variables)

    def copy_into_twin(*stored):
        targets = fast_ops.stored_values(twin_variables)
        with torch.inference_mode(False), torch.no_grad():
            for variable, target, value in zip(twin_variables, targets, stored, strict=True):
                if target is not value:  # a float32 weight the copy shares is current
                    variable.assign(value.float())
        return ()  # nothing to keep: the copy is in the twin's variables

    def run(x):
        torch_prepared_from(model, variables, None, copy_into_twin, variant="float32_twin")
        return twin(x, training=False)

    return run
