"""The writers of `weights_convert.export`: the graph handed to an exporter (behind its
normalisation layer), each backend's route to each format (`model.export`, torch's dynamo
ONNX exporter), the check that TensorFlow runs a JAX-written SavedModel, and the files
written atomically (an ONNX file made self-contained, OpenVINO's .bin beside its .xml).

Keras, the backends and the exporters are imported inside the functions that use them:
importing this module loads none of them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

import numpy as np

from convnext_common.files import atomic_path
from weights_convert.export_options import ExportUnavailableError


def _run_exporter(model, path, format, shape, input_dtype, dtype, verbose):
    import keras  # Keras: imported once an export is written (--help imports this module)

    backend = keras.backend.backend()
    signature = [keras.InputSpec(shape=shape, dtype=input_dtype, name="image")]
    if format == "onnx" and backend == "torch":
        return _torch_onnx(model, path, shape, input_dtype)
    keras_format = {"saved_model": "tf_saved_model"}.get(format, format)
    options = {}
    if format == "litert" and dtype != "float32":
        import tensorflow as tf  # the backend: LiteRT is exported on tensorflow alone

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
    import keras  # Keras: imported once a SavedModel is asked for on jax

    # loads Keras too: imported once a SavedModel is asked for on jax
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
    # the backends: a SavedModel written on jax, run by TensorFlow (installed for it)
    import jax
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
    import torch  # the backend: ONNX on torch alone

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
    import keras  # Keras: imported once an export is written (--help imports this module)

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
    # onnx: optional (the `export` extra), needed by ONNX exports alone
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
    import onnx  # optional (the `export` extra), needed by ONNX exports alone

    graph = onnx.load(path, load_external_data=False).graph
    for output, node in zip(outputs, graph.output, strict=False):
        output["name"] = node.name
    return graph.input[0].name, outputs
