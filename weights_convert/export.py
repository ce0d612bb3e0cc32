"""Deploying a model: ONNX, LiteRT (TFLite), TensorFlow SavedModel or OpenVINO files
that run without this project, Keras or timm, plus a sidecar JSON that says how to
feed them.

    from weights_convert import export_model
    export_model(model, "embedder.onnx")                      # format from the suffix
    export_model(model, "embedder.tflite", dtype="int8")      # dynamic-range int8 LiteRT
    export_model(model, "saved/", with_normalization=True)    # a SavedModel taking [0, 1] RGB

What each backend can export (Keras 3.15, `model.export`), and what runs it:

| format      | tensorflow         | jax                 | torch                          |
|-------------|--------------------|---------------------|--------------------------------|
| onnx        | tf2onnx            | jax2onnx            | torch.onnx (dynamo, onnxscript)|
| litert      | TFLiteConverter    | - (use tensorflow)  | - (use tensorflow)             |
| saved_model | tf.saved_model     | jax2tf (*)          | - (needs torch_xla)            |
| openvino    | openvino           | openvino            | openvino                       |

(*) checked after writing: TensorFlow runs it once, and an export the installed
TensorFlow cannot run (a JAX newer than it) is refused, with nothing written.

Everything goes through `model.export(format=...)` except ONNX on torch: Keras'
torch route traces with TorchScript when a dimension is dynamic, which fails on
`keras.layers.LayerNormalization` (its normalized_shape becomes a traced value), so
the torch ONNX file comes from `torch.onnx.export(dynamo=True, dynamic_shapes=...)`,
the exporter Keras itself tries first for static shapes. LiteRT on torch needs
`litert-torch` (static shapes only) and SavedModel on torch needs `torch_xla`;
neither is part of this project, so those are refused with the backend to use.

The graph is traced under `fast_ops.portable()`: every layer uses its keras-ops
formulation, never a backend fast path (torch's oneDNN linear, the channels_last
convolutions, TensorFlow's MatMul/BiasAdd layout, JAX's 49-term shifted sum), so
the exporters see standard ops (one Conv per convolution layer).

Options: a dynamic batch (default) or a fixed one; the spatial size fixed at the
checkpoint's input size (default), another fixed size or dynamic;
`with_normalization` puts `(x / 255 - mean) / std` inside the graph, so the
deployed model takes resized, cropped RGB pixels in [0, 1] (float32) or 0..255
(`input_dtype="uint8"`); `dtype` "float16" or "int8" (dynamic-range: int8
weights, float activations) for LiteRT.

The sidecar (`export_sidecar_path`: `PATH.json` beside a file, `PATH/keras_convnext.json`
inside a SavedModel folder) records the preprocessing (resize, crop, interpolation,
mean / std and whether they are in the graph), the input layout / dtype / shape,
the outputs, the timm architecture, the licence and a calibrated threshold when
the model's metadata has one (key "calibration").

This module is the face and the dispatch (`export_model`, `check_backend_supports`);
the options and their checks are in `export_options`, the writers of each format in
`export_writers`, the sidecar in `export_sidecar`. Every name is importable from here.
"""

from __future__ import annotations

import importlib.util
import json

from convnext_common.files import atomic_folder, atomic_write_text
from weights_convert.export_options import (
    _FORMAT_NAMES,
    _NOT_HERE,
    _PIP_NAMES,
    DTYPES,
    FORMATS,
    INPUT_DTYPES,
    SUFFIXES,
    SUPPORT,
    ExportError,
    ExportUnavailableError,
    _active_backend,
    check_export_options,
    check_output,
    format_for_path,
)
from weights_convert.export_sidecar import (
    CHANNEL_ORDERS,
    SAVED_MODEL_SIDECAR,
    SIDECAR_FORMAT,
    SIDECAR_KIND,
    _cfg_input_size,
    _mean_std,
    describe_export,
    export_sidecar_path,
)
from weights_convert.export_writers import (
    _jax_saved_model_problem,
    _onnx_names,
    _run_exporter,
    _self_contained_onnx,
    _with_normalization,
    _write_file,
)

__all__ = [
    "CHANNEL_ORDERS",
    "DTYPES",
    "FORMATS",
    "INPUT_DTYPES",
    "SAVED_MODEL_SIDECAR",
    "SIDECAR_FORMAT",
    "SIDECAR_KIND",
    "SUFFIXES",
    "SUPPORT",
    "ExportError",
    "ExportUnavailableError",
    "check_backend_supports",
    "check_export_options",
    "check_output",
    "describe_export",
    "export_model",
    "export_sidecar_path",
    "format_for_path",
]


def check_backend_supports(format: str, backend: str | None = None) -> None:
    """Raise `ExportUnavailableError` if `backend` (default: Keras' active one, read
    from KERAS_BACKEND without importing Keras if it is not loaded yet) cannot
    export `format`, naming the backends that can; or if the exporter package is
    missing, naming it."""
    backend = backend or _active_backend()
    able = SUPPORT[format]
    if backend not in able:
        why = _NOT_HERE.get((format, backend), f"Keras has no {format} exporter for it")
        others = " or ".join(f"KERAS_BACKEND={b}" for b in able)
        raise ExportUnavailableError(
            f"{_FORMAT_NAMES[format]} export is not available on the {backend} backend "
            f"({why}); use {others}."
        )
    missing = [m for m in able[backend] if importlib.util.find_spec(m) is None]
    if missing:
        packages = " ".join(_PIP_NAMES.get(m, m) for m in missing)
        raise ExportUnavailableError(
            f"{_FORMAT_NAMES[format]} export on the {backend} backend needs {', '.join(missing)}: "
            f"pip install {packages} (or the project's `export` extra)."
        )
    if format == "saved_model" and backend == "jax":
        problem = _jax_saved_model_problem()
        if problem is not None:
            raise ExportUnavailableError(problem)


# ----------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------


def export_model(
    model,
    path,
    *,
    format: str | None = None,
    dtype: str = "float32",
    batch_size: int | None = None,
    input_size=None,
    dynamic_size: bool = False,
    with_normalization: bool = False,
    input_dtype: str = "float32",
    pretrained_cfg: dict | None = None,
    threshold: float | None = None,
    verbose: bool = False,
) -> dict:
    """Export `model` (a `ConvNeXt` or any single-input image model) to `path` and write
    its sidecar; returns the sidecar's content.

    Args:
        model: a built `keras.Model` taking (B, H, W, C) normalised images (C its
            input channels: 3 for RGB, 1 for greyscale, ...).
        path: `.onnx`, `.tflite`, `.xml` (OpenVINO) or a folder (SavedModel).
        format: "onnx", "litert", "saved_model" or "openvino" (default: from `path`).
        dtype: "float32"; for LiteRT also "float16" or "int8" (dynamic range).
        batch_size: None for a dynamic batch dimension, else that fixed batch.
        input_size: (height, width) to fix; default the checkpoint's input size
            (`pretrained_cfg["input_size"]`), or the model's own fixed size.
        dynamic_size: leave height and width dynamic instead.
        with_normalization: (x / 255 - mean) / std inside the graph: the exported
            model takes RGB pixels in [0, 1] (float32) or 0..255 (uint8).
        input_dtype: "float32" or, with with_normalization, "uint8".
        pretrained_cfg: the preprocessing to record (default `model.pretrained_cfg`).
        threshold: a verification threshold to record (default: the model's
            metadata "calibration" threshold, if any).

    Raises `ExportError` (bad options) and `ExportUnavailableError` (format not
    available on this backend or its exporter missing) before any work; the
    file and its sidecar appear whole or not at all.
    """
    format = format_for_path(path, format)
    check_export_options(
        format,
        dtype=dtype,
        batch_size=batch_size,
        input_size=input_size,
        dynamic_size=dynamic_size,
        with_normalization=with_normalization,
        input_dtype=input_dtype,
    )
    check_backend_supports(format)
    output = check_output(path, format)
    if pretrained_cfg is None:
        pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    height, width = _spatial_size(model, pretrained_cfg, input_size, dynamic_size)
    channels = _channels(model)
    mean, std = _mean_std(pretrained_cfg, channels)
    graph = _with_normalization(model, mean, std, input_dtype) if with_normalization else model
    shape = (batch_size, height, width, channels)
    description = describe_export(
        model,
        format=format,
        dtype=dtype,
        input_shape=shape,
        input_dtype=input_dtype if with_normalization else "float32",
        with_normalization=with_normalization,
        pretrained_cfg=pretrained_cfg,
        threshold=threshold,
    )
    # loads Keras: imported when an export is asked for, so --help is instant
    from convnext_layers import fast_ops

    writer = atomic_folder if format == "saved_model" else _write_file
    with writer(output) as tmp, fast_ops.portable():  # no backend fast path in the graph
        _run_exporter(graph, tmp, format, shape, description["input"]["dtype"], dtype, verbose)
        if format == "onnx":
            _self_contained_onnx(tmp, output)
            description["input"]["name"], description["outputs"] = _onnx_names(
                tmp, description["outputs"]
            )
    atomic_write_text(export_sidecar_path(output, format), json.dumps(description, indent=1) + "\n")
    return description


def _spatial_size(model, pretrained_cfg, input_size, dynamic_size):
    """(height, width) of the export signature; None for a dynamic side."""
    fixed = tuple(model.input_shape[1:3])
    if input_size is not None:
        wanted = tuple(int(v) for v in input_size)
    elif dynamic_size:
        wanted = (None, None)
    elif None not in fixed:
        wanted = fixed
    else:
        wanted = _cfg_input_size(pretrained_cfg)
        if wanted is None:
            raise ExportError(
                "The model has no fixed input size and no pretrained_cfg input_size: give "
                "input_size=(H, W) (--input-size H W) or dynamic_size=True (--dynamic-size)."
            )
    if None not in fixed and wanted != fixed:
        raise ExportError(
            f"The model was built for {fixed[0]}x{fixed[1]} inputs; it cannot be exported for "
            f"{'any size' if wanted == (None, None) else f'{wanted[0]}x{wanted[1]}'}."
        )
    return wanted


def _channels(model) -> int:
    """Input channels of a single-input image model (its input's last axis)."""
    channels = model.input_shape[-1]
    if not isinstance(channels, int):
        raise ExportError(f"The model's input {model.input_shape} has no known channel count.")
    return channels
