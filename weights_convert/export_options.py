"""The export options and the checks made before any model is loaded: formats, dtypes,
suffixes, what each backend can export, and the errors of `weights_convert.export`.

The standard library alone (and convnext_common's errors and files): `python -m
weights_convert --help` builds its options from here.
"""

from __future__ import annotations

import os
import sys

from convnext_common.errors import InputError
from convnext_common.files import check_output_path

FORMATS = ("onnx", "litert", "saved_model", "openvino")
DTYPES = ("float32", "float16", "int8")
INPUT_DTYPES = ("float32", "uint8")
SUFFIXES = {".onnx": "onnx", ".tflite": "litert", ".xml": "openvino"}
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

_FORMAT_NAMES = {
    "onnx": "ONNX",
    "litert": "LiteRT",
    "saved_model": "SavedModel",
    "openvino": "OpenVINO",
}


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


def _active_backend() -> str:
    """Keras' active backend, read from KERAS_BACKEND without importing Keras if it is not
    loaded yet."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def _is_saved_model(folder) -> bool:
    return os.path.isfile(os.path.join(folder, "saved_model.pb"))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
