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
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import tempfile

from convnext_common.errors import InputError
from convnext_common.files import (
    atomic_folder,
    atomic_path,
    atomic_write_text,
    check_output_path,
)
from convnext_common.jsonable import jsonable

FORMATS = ("onnx", "litert", "saved_model", "openvino")
DTYPES = ("float32", "float16", "int8")
INPUT_DTYPES = ("float32", "uint8")
SUFFIXES = {".onnx": "onnx", ".tflite": "litert", ".xml": "openvino"}
SIDECAR_KIND = "keras-convnext-export"
SIDECAR_FORMAT = 1
SAVED_MODEL_SIDECAR = "keras_convnext.json"

# format -> {backend: modules the exporter needs}; a backend missing here cannot export it
SUPPORT = {
    "onnx": {
        "tensorflow": ("tf2onnx", "onnx"),
        "jax": ("jax2onnx", "onnx"),
        "torch": ("onnxscript", "onnx"),
    },
    "litert": {"tensorflow": ()},
    "saved_model": {"tensorflow": (), "jax": ("tensorflow",)},
    "openvino": {"tensorflow": ("openvino",), "jax": ("openvino",), "torch": ("openvino",)},
}
# why a backend cannot, where Keras could with something this project does not ship
_NOT_HERE = {
    ("litert", "torch"): "Keras' torch route needs the litert-torch package and fixed "
    "shapes, which this project does not test",
    ("litert", "jax"): "Keras has no LiteRT exporter for JAX",
    ("saved_model", "torch"): "Keras' torch route needs torch_xla",
}
_PIP_NAMES = {"tf2onnx": "tf2onnx", "jax2onnx": "jax2onnx", "onnxscript": "onnxscript",
              "onnx": "onnx", "openvino": "openvino", "tensorflow": "tensorflow-cpu"}  # fmt: skip


class ExportError(InputError, ValueError):
    """An export that cannot be done as asked: bad options, a format the active
    backend cannot export, a missing exporter package."""


class ExportUnavailableError(ExportError):
    """The format cannot be exported from the active Keras backend (or its exporter
    package is missing); the message names the backend or package to use."""


# ----------------------------------------------------------------------------
# Checks (cheap, before any model is loaded)
# ----------------------------------------------------------------------------


def format_for_path(path, format: str | None = None) -> str:
    """The export format of `path`: `format` if given, else from the suffix
    (.onnx, .tflite, .xml = OpenVINO), a trailing slash or an existing folder
    (SavedModel)."""
    path = os.fspath(path)
    if format is not None:
        if format not in FORMATS:
            raise ExportError(f"Unknown export format {format!r}; one of {', '.join(FORMATS)}.")
        expected = {v: k for k, v in SUFFIXES.items()}.get(format)
        if expected and not path.endswith(expected):
            raise ExportError(f"A {format} export is written to a {expected} file; got {path!r}.")
        if format == "saved_model" and os.path.isfile(path):
            raise ExportError(f"A SavedModel is a folder; {path!r} is a file.")
        return format
    for suffix, name in SUFFIXES.items():
        if path.endswith(suffix):
            return name
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return "saved_model"
    raise ExportError(
        f"Cannot tell the export format of {path!r}: use a .onnx, .tflite or .xml (OpenVINO) "
        "file, a folder (SavedModel: end the path with '/'), or pass --format / format= "
        f"({', '.join(FORMATS)})."
    )


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


def check_export_options(
    format: str,
    *,
    dtype: str = "float32",
    batch_size: int | None = None,
    input_size=None,
    dynamic_size: bool = False,
    with_normalization: bool = False,
    input_dtype: str = "float32",
) -> None:
    """Raise `ExportError` naming the option and the valid choices."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}.")
    if dtype != "float32" and format != "litert":
        raise ExportError(
            f"dtype {dtype!r} is a LiteRT option (float16 weights, or dynamic-range int8); "
            f"{_FORMAT_NAMES[format]} exports float32."
        )
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ExportError(
            f"batch_size must be a positive int or None (dynamic); got {batch_size!r}."
        )
    if input_size is not None:
        if dynamic_size:
            raise ExportError("Give either a fixed input_size or dynamic_size, not both.")
        if (
            isinstance(input_size, (str, bytes))
            or not hasattr(input_size, "__len__")
            or len(input_size) != 2
            or not all(_is_int(v) and v >= 1 for v in input_size)
        ):
            raise ExportError(
                f"input_size must be (height, width) of positive ints; got {input_size!r}."
            )
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(
            f"input_dtype must be one of {', '.join(INPUT_DTYPES)}; got {input_dtype!r}."
        )
    if input_dtype != "float32" and not with_normalization:
        raise ExportError(
            "input_dtype 'uint8' needs with_normalization (the graph scales 0..255 pixels and "
            "applies mean / std); without it the model takes normalised float32."
        )


def check_output(path, format: str) -> str:
    """Refuse an output that cannot be written, before any work: a file where a
    SavedModel folder goes, a non-empty folder that is not a SavedModel, an
    unwritable place."""
    path = os.fspath(path)
    if format != "saved_model":
        return check_output_path(path, option=f"{format} output")
    folder = path.rstrip("/" + os.sep) or path
    if os.path.isdir(folder) and os.listdir(folder) and not _is_saved_model(folder):
        raise ExportError(
            f"{folder!r} is a folder that holds something other than a SavedModel; give a new "
            "or empty folder (a SavedModel folder there is replaced)."
        )
    check_output_path(os.path.join(folder, "saved_model.pb"), option="SavedModel folder")
    return folder


def export_sidecar_path(path, format: str | None = None) -> str:
    """Where the sidecar JSON of an export goes: 'm.onnx' -> 'm.onnx.json',
    'folder/' (SavedModel) -> 'folder/keras_convnext.json'."""
    path = os.fspath(path)
    format = format or format_for_path(path)
    if format == "saved_model":
        return os.path.join(path.rstrip("/" + os.sep) or path, SAVED_MODEL_SIDECAR)
    return path + ".json"


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


def _run_exporter(model, path, format, shape, input_dtype, dtype, verbose):
    import keras

    backend = keras.backend.backend()
    signature = [keras.InputSpec(shape=shape, dtype=input_dtype, name="image")]
    if format == "onnx" and backend == "torch":
        return _torch_onnx(model, path, shape, input_dtype)
    keras_format = {"saved_model": "tf_saved_model"}.get(format, format)
    options = {}
    if format == "litert" and dtype != "float32":
        import tensorflow as tf

        options["optimizations"] = [tf.lite.Optimize.DEFAULT]  # dynamic-range int8 weights
        if dtype == "float16":
            options["target_spec"] = {"supported_types": [tf.float16]}
    if backend == "torch":
        _track_torch_parameters(model)
    model.export(path, format=keras_format, input_signature=signature, verbose=verbose, **options)
    if format == "saved_model" and backend == "jax":
        _check_tensorflow_runs(path, shape, input_dtype)


@functools.lru_cache(maxsize=1)
def _jax_saved_model_problem() -> str | None:
    """Why this TensorFlow cannot run this JAX's SavedModels, or None: the refusal of
    `_check_tensorflow_runs` on a SavedModel, written by JAX, of a small model made
    of a ConvNeXt block's layers (depthwise conv, LayerNorm, the pointwise Dense
    with its exact GELU), so a TensorFlow too old for this JAX is found in seconds,
    before a model is converted and exported in full. Once per process: the answer
    is returned, not raised, so the cache keeps a refusal too."""
    import keras

    from convnext_layers.layers import DepthwiseConv, PointwiseDense, activation_function

    inputs = keras.Input((8, 8, 4))
    x = DepthwiseConv(3)(inputs)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = PointwiseDense(16, activation=activation_function("gelu"))(x)
    probe = keras.Model(inputs, PointwiseDense(4)(x))
    with tempfile.TemporaryDirectory(prefix="convnext-saved-model-probe-") as folder:
        path = os.path.join(folder, "probe")
        with _native_stderr_silenced():  # TensorFlow's and XLA's C++ logs of the failure
            probe.export(path, format="tf_saved_model", verbose=False)
            try:
                _check_tensorflow_runs(path, (None, 8, 8, 4), "float32")
            except ExportUnavailableError as refusal:
                return str(refusal)
    return None


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null for the block (C++ libraries log there, below
    Python's `sys.stderr`); restored however the block ends."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _check_tensorflow_runs(path, shape, input_dtype):
    """Run a JAX-written SavedModel once in TensorFlow. jax2tf embeds the graph as
    StableHLO targeting the StableHLO of about 4 weeks before the JAX release; an
    older TensorFlow cannot read it (measured: JAX 0.10.2's erf reaches TensorFlow
    2.21 as an unknown `vhlo.composite_v2` op), so that export is refused."""
    import jax
    import numpy as np
    import tensorflow as tf

    example = np.zeros([1 if d is None else d for d in shape], dtype=input_dtype)
    if None in shape[1:3]:
        example = np.zeros((1, 64, 64, shape[3]), dtype=input_dtype)
    try:
        loaded = tf.saved_model.load(path)
        loaded.serve(tf.constant(example))
    except Exception as error:
        text = " ".join(line.strip() for line in str(error).splitlines())
        first = text[text.find("unregistered") :] if "unregistered" in text else text
        raise ExportUnavailableError(
            f"TensorFlow {tf.__version__} cannot run the SavedModel that JAX {jax.__version__} "
            f"wrote ({type(error).__name__}: {first[:200]}); use KERAS_BACKEND=tensorflow for "
            "a SavedModel, or a TensorFlow release as new as this JAX."
        ) from None


def _torch_onnx(model, path, shape, input_dtype):
    """torch's dynamo ONNX exporter with the dynamic dimensions of `shape` (None) marked."""
    import numpy as np
    import torch

    _track_torch_parameters(model)
    names = ("batch", "height", "width")
    dynamic = {
        axis: torch.export.Dim(names[axis], min=1 if axis == 0 else 32)
        for axis in range(3)
        if shape[axis] is None
    }
    # an example input: 2 for a dynamic batch (torch specialises sizes 0 and 1), 64 pixels
    example_shape = [(2 if axis == 0 else 64) if d is None else d for axis, d in enumerate(shape)]
    example = torch.from_numpy(np.zeros(example_shape, dtype=input_dtype))
    model.eval()
    with torch.no_grad():
        # Keras' torch layers take *args: the dynamic shapes of the one positional input
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=((dynamic,),) if dynamic else None,
            input_names=["image"],
            verbose=False,
        )
        program.optimize()
        program.save(path)


def _track_torch_parameters(model):
    """Register every variable as a torch parameter of `model`: models whose variables
    were created uninitialised (a fast load) have not done it yet, and torch's
    tracers refuse tensors that require grad but are not parameters."""
    model.named_parameters()


def _with_normalization(model, mean, std, input_dtype):
    """`model` behind one affine layer: [0, 1] (or 0..255 uint8) pixels -> (x - mean) / std,
    one mean / std per input channel."""
    import keras

    range_max = 255.0 if input_dtype == "uint8" else 1.0
    inputs = keras.Input(shape=model.input_shape[1:], dtype=input_dtype, name="image")
    scaled = keras.layers.Rescaling(
        scale=[1.0 / (range_max * s) for s in std],
        offset=[-m / s for m, s in zip(mean, std, strict=True)],
        name="normalize",
    )(inputs)
    return keras.Model(inputs, model(scaled), name=f"{model.name}_with_normalization")


@contextlib.contextmanager
def _write_file(path):
    # OpenVINO writes its weights to NAME.bin beside NAME.xml and finds them by name: a
    # companion that moves with the file; anything else written beside the temporary
    # file (an exporter's external data) is removed by atomic_path
    with atomic_path(path, companions=(".bin",) if path.endswith(".xml") else ()) as tmp:
        os.remove(tmp)  # the exporters create the file themselves
        yield tmp


def _self_contained_onnx(tmp, output) -> None:
    """Move the weights an ONNX exporter wrote as external data beside `tmp` (named
    after the temporary file, so unusable once it is renamed) into the file itself;
    above protobuf's 2 GB limit, into one `OUTPUT.data` file beside the output."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(tmp, load_external_data=False).graph
    if not any(uses_external_data(tensor) for tensor in graph.initializer):
        return
    model = onnx.load(tmp)  # reads the external data from beside tmp
    if model.ByteSize() < 2**31 - 1:
        onnx.save_model(model, tmp)
    else:
        location = os.path.basename(output) + ".data"
        onnx.save_model(model, tmp, save_as_external_data=True, location=location)


def _onnx_names(path, outputs):
    """The ONNX graph's input name and its output names (added to `outputs`)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    for output, node in zip(outputs, graph.output, strict=False):
        output["name"] = node.name
    return graph.input[0].name, outputs


# ----------------------------------------------------------------------------
# The sidecar
# ----------------------------------------------------------------------------


def describe_export(
    model,
    *,
    format: str,
    dtype: str,
    input_shape,
    input_dtype: str,
    with_normalization: bool,
    pretrained_cfg: dict,
    threshold: float | None = None,
) -> dict:
    """The sidecar's content: everything a deployment needs to reproduce the output."""
    import keras

    from weights_convert.pretrained import license_notice

    channels = input_shape[3]
    mean, std = _mean_std(pretrained_cfg, channels)
    order = CHANNEL_ORDERS.get(channels, f"{channels} channels")
    height, width = _cfg_input_size(pretrained_cfg) or input_shape[1:3]
    crop_pct = float(pretrained_cfg.get("crop_pct") or 0.875)
    metadata = dict(getattr(model, "metadata", None) or {})
    calibration = metadata.get("calibration")
    if threshold is None and calibration is not None:
        threshold = _calibrated_threshold(calibration)
    if threshold is not None and (not _is_number(threshold) or not math.isfinite(threshold)):
        raise ExportError(f"threshold must be a finite number; got {threshold!r}.")
    value_range = {"uint8": [0, 255], "float32": [0.0, 1.0]}[input_dtype]
    license_name = pretrained_cfg.get("license")
    return {
        "kind": SIDECAR_KIND,
        "format": SIDECAR_FORMAT,
        "export": {
            "format": format,
            "dtype": dtype,
            "backend": keras.backend.backend(),
            "keras_version": keras.__version__,
        },
        "timm_architecture": getattr(model, "timm_architecture", None),
        "license": license_name,
        "license_notice": license_notice(pretrained_cfg),
        "input": {
            "name": "image",
            "layout": "NHWC",
            "channel_order": order,
            "shape": list(input_shape),
            "dtype": input_dtype,
            "value": (
                f"{order} pixels in {value_range} (resized and cropped, not normalised)"
                if with_normalization
                else f"(x / 255 - mean) / std of {order} pixels x in 0..255"
            ),
        },
        "preprocessing": {
            "input_size": [int(height), int(width)],
            "resize_shorter_side_to": [math.floor(s / crop_pct) for s in (height, width)],
            "crop_pct": crop_pct,
            "crop_mode": pretrained_cfg.get("crop_mode") or "center",
            "interpolation": pretrained_cfg.get("interpolation") or "bicubic",
            "mean": list(mean),
            "std": list(std),
            "normalization_in_graph": with_normalization,
            "recipe": (
                "timm's eval transform: resize so the shorter side is floor(size / crop_pct) "
                "with the interpolation, centre-crop to input_size, scale to [0, 1]"
                + ("" if with_normalization else ", subtract mean, divide by std")
            ),
        },
        "outputs": _describe_outputs(model),
        "threshold": None if threshold is None else float(threshold),
        "calibration": calibration,
        "pretrained_cfg": jsonable(pretrained_cfg),
    }


def _describe_outputs(model) -> list[dict]:
    shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    if len(shapes) > 1 or len(shapes[0]) != 2:
        kind = "features"
    elif getattr(model, "normalize", False):
        kind = "embedding"
    elif getattr(model, "num_classes", 0):
        kind = "logits" if getattr(model, "classifier_activation", None) is None else "scores"
    else:
        kind = "features"
    return [
        {
            "kind": kind,
            "shape": list(shape),
            "dim": shape[-1],
            "l2_normalized": bool(getattr(model, "normalize", False)) and kind == "embedding",
        }
        for shape in shapes
    ]


def _calibrated_threshold(calibration) -> float:
    threshold = calibration.get("threshold") if isinstance(calibration, dict) else None
    if not _is_number(threshold) or not math.isfinite(threshold):
        raise ExportError(
            "The model's metadata 'calibration' must be a dict with a finite 'threshold'; "
            f"got {calibration!r:.120}."
        )
    return float(threshold)


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

_FORMAT_NAMES = {
    "onnx": "ONNX",
    "litert": "LiteRT",
    "saved_model": "SavedModel",
    "openvino": "OpenVINO",
}


def _active_backend() -> str:
    import sys

    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


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


def _cfg_input_size(pretrained_cfg):
    size = (pretrained_cfg or {}).get("input_size")
    if not size:
        return None
    size = tuple(int(v) for v in size)
    return size[-2:]


def _mean_std(pretrained_cfg, channels):
    from weights_convert.pretrained import channel_mean_std

    return channel_mean_std(pretrained_cfg, channels)


# what the sidecar calls an input of this many channels (PIL's modes of those images)
CHANNEL_ORDERS = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}


def _channels(model) -> int:
    """Input channels of a single-input image model (its input's last axis)."""
    channels = model.input_shape[-1]
    if not isinstance(channels, int):
        raise ExportError(f"The model's input {model.input_shape} has no known channel count.")
    return channels


def _is_saved_model(folder) -> bool:
    return os.path.isfile(os.path.join(folder, "saved_model.pb"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
