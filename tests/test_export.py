"""`weights_convert.export`: ONNX, LiteRT and SavedModel files, run by onnxruntime,
LiteRT's interpreter and TensorFlow, against timm's L2-normalised pre-logits on
scikit-image's photographs preprocessed by the sidecar's recipe; the refusals; the
command lines (`python -m weights_convert ... -o x.onnx`, `python -m embedding export`).

Exports are traced on the active backend (KERAS_BACKEND); a format that backend
cannot export is skipped with the refusal message as the reason, and the refusal
itself is tested."""

import contextlib
import json
import os
import subprocess
import sys
import types
from unittest import mock

import keras
import numpy as np
import pytest
import skimage.data
import torch
from conftest import BACKEND, random_timm_model, save_timm_checkpoint

from convnext_layers.fast_ops import jax_kernels, tensorflow_kernels, torch_kernels
from embedding import Embedder, Preprocessor, load_image
from embedding import cli as embedding_cli
from weights_convert import cli as convert_cli
from weights_convert import export as export_module
from weights_convert import export_writers
from weights_convert.export import ExportError, ExportUnavailableError, export_model

SIZE = 64  # the checkpoints' pretrained_cfg input size: cheap exports
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")  # camera is grey
ATOL = 1e-4  # the bar: exported embeddings within 1e-4 of timm's
# the measured cosines to timm are 0.99999+ (float16) and 0.9999+ (int8; README, Deploy);
# these bounds only catch a broken quantized file, they are not the accuracy claim
QUANTIZED_MIN_COSINE = {"float16": 0.999, "int8": 0.99}
# every convolution of convnext_atto: stem, 3 downsampling convs, 2+2+6+2 depthwise
ATTO_CONVOLUTIONS = 1 + 3 + 12
FAST_PATHS = (
    (torch_kernels, "torch_linear"),
    (torch_kernels, "torch_conv2d_nhwc"),
    (torch_kernels, "torch_multiply_add"),
    (torch_kernels, "residual_dense"),
    (torch_kernels, "torch_response_norm"),
    (torch_kernels, "whole_block"),
    (tensorflow_kernels, "tensorflow_dense"),
    (jax_kernels, "depthwise_shifted_sum"),
)


def can_export(format):
    """None if the active backend exports `format` here, else the refusal message."""
    try:
        export_module.check_backend_supports(format)
    except ExportUnavailableError as error:
        return str(error)
    return None


def skip_unless_exportable(format):
    reason = can_export(format)
    if reason:
        pytest.skip(f"{BACKEND} backend: {reason}")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{arch: (folder, timm model)}: random timm models whose pretrained_cfg asks for 64x64."""
    out = {}
    for seed, arch in enumerate(("convnext_atto", "convnextv2_atto"), start=11):
        model = random_timm_model(arch, seed=seed)
        folder = tmp_path_factory.mktemp(arch)
        cfg = {"input_size": (3, SIZE, SIZE), "crop_pct": 0.875, "interpolation": "bicubic"}
        out[arch] = (str(save_timm_checkpoint(model, folder, arch, pretrained_cfg=cfg)), model)
    return out


@pytest.fixture(scope="session")
def photos():
    return [getattr(skimage.data, name)() for name in PHOTOS]


@contextlib.contextmanager
def no_fast_path_runs():
    """Fail if any backend fast path is called inside the block (while tracing an export)."""
    calls = []

    def spy(name, function):
        def record_and_run(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)

        return record_and_run

    with contextlib.ExitStack() as stack:
        for module, name in FAST_PATHS:
            stack.enter_context(mock.patch.object(module, name, spy(name, getattr(module, name))))
        yield
    assert calls == [], f"fast paths ran while exporting: {sorted(set(calls))}"


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory):
    """export(arch, name, **options) -> (path, sidecar dict): each export made once."""
    done = {}
    folder = tmp_path_factory.mktemp("exports")

    def export(arch, name, **options):
        key = (arch, name, tuple(sorted(options.items())))
        if key not in done:
            path = os.path.join(str(folder), f"{arch}_{len(done)}_{name}")
            embedder = Embedder(checkpoints[arch][0], cache=False)
            try:
                with no_fast_path_runs():
                    embedder.export(path, **options)
            except ExportUnavailableError as error:  # found out while exporting
                assert "use KERAS_BACKEND=tensorflow" in str(error)
                assert not os.path.exists(path)
                done[key] = error
            else:
                with open(export_module.export_sidecar_path(path)) as f:
                    done[key] = path, json.load(f)
        if isinstance(done[key], ExportUnavailableError):
            pytest.skip(f"{BACKEND} backend: {done[key]}")
        return done[key]

    return export


def timm_embeddings(timm_model, images_nhwc):
    """timm's L2-normalised pre-logits: the reference."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        features = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(features, dim=1).numpy()


def preprocess(sidecar, photos):
    """The photographs through the sidecar's recipe: (N, H, W, 3) float32."""
    preprocessor = Preprocessor(sidecar["preprocessing"])
    return np.stack([preprocessor(image) for image in photos])


def run_onnx(path, x):
    onnxruntime = pytest.importorskip("onnxruntime", reason="the `export` extra runs ONNX files")

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def run_litert(path, x):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own copy
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=path)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def run_saved_model(path, x):
    import tensorflow as tf

    loaded = tf.saved_model.load(path)  # kept referenced: it owns the variables
    return loaded.serve(tf.constant(x)).numpy()


RUNNERS = {"onnx": run_onnx, "litert": run_litert, "saved_model": run_saved_model}
SUFFIX = {"onnx": ".onnx", "litert": ".tflite", "saved_model": "/"}


def check_against_timm(format, path, sidecar, timm_model, photos):
    """Batch of 5 and batch of 1 within ATOL of timm; returns the batch-5 outputs."""
    x = preprocess(sidecar, photos)
    reference = timm_embeddings(timm_model, x)
    out = RUNNERS[format](path, x)
    assert out.shape == reference.shape == (5, sidecar["outputs"][0]["dim"])
    np.testing.assert_allclose(out, reference, atol=ATOL, rtol=0)
    single = RUNNERS[format](path, x[:1])
    np.testing.assert_allclose(single, reference[:1], atol=ATOL, rtol=0)
    return out


# ----------------------------------------------------------------------------
# Exported files against timm
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
def test_onnx_embeddings_match_timm(arch, exported, checkpoints, photos):
    skip_unless_exportable("onnx")
    # V2 with any height and width, V1 at the checkpoint's size (the default)
    dynamic = arch == "convnextv2_atto"
    path, sidecar = exported(arch, "embedder.onnx", dynamic_size=dynamic)
    timm_model = checkpoints[arch][1]
    check_against_timm("onnx", path, sidecar, timm_model, photos)
    expected_shape = [None, None if dynamic else SIZE, None if dynamic else SIZE, 3]
    assert sidecar["input"]["shape"] == expected_shape
    assert sidecar["preprocessing"]["input_size"] == [SIZE, SIZE]
    if dynamic:  # another size, through a recipe for that size
        cfg = {**sidecar["preprocessing"], "input_size": [80, 96]}
        x = np.stack([Preprocessor(cfg)(image) for image in photos[:2]])
        np.testing.assert_allclose(
            run_onnx(path, x), timm_embeddings(timm_model, x), atol=ATOL, rtol=0
        )


@pytest.mark.slow
def test_onnx_graph_uses_the_portable_formulation(exported):
    """One Conv node per convolution layer (JAX's shifted-sum depthwise would leave
    slices and adds instead), standard ONNX ops only (no oneDNN / custom domains);
    the `exported` fixture also fails if a fast path ran while tracing."""
    import onnx

    skip_unless_exportable("onnx")
    path, _ = exported("convnext_atto", "embedder.onnx", dynamic_size=False)
    graph = onnx.load(path).graph
    assert sum(node.op_type == "Conv" for node in graph.node) == ATTO_CONVOLUTIONS
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
def test_litert_float32_matches_timm(arch, exported, checkpoints, photos):
    skip_unless_exportable("litert")
    path, sidecar = exported(arch, "embedder.tflite")
    assert sidecar["export"] == {**sidecar["export"], "format": "litert", "dtype": "float32"}
    check_against_timm("litert", path, sidecar, checkpoints[arch][1], photos)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_atto", "convnextv2_atto"])
def test_reloaded_saved_model_matches_timm(arch, exported, checkpoints, photos):
    skip_unless_exportable("saved_model")
    if BACKEND == "jax" and arch == "convnextv2_atto":
        pytest.skip("jax: SavedModel checked on convnext_atto only (keeps the suite short)")
    path, sidecar = exported(arch, "saved_model/")
    assert os.path.isfile(os.path.join(path, "saved_model.pb"))
    assert export_module.export_sidecar_path(path).startswith(path)
    check_against_timm("saved_model", path, sidecar, checkpoints[arch][1], photos)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantized_litert_runs_close_to_timm(dtype, exported, checkpoints, photos):
    skip_unless_exportable("litert")
    path, sidecar = exported("convnext_atto", f"{dtype}.tflite", dtype=dtype)
    assert sidecar["export"]["dtype"] == dtype
    x = preprocess(sidecar, photos)
    reference = timm_embeddings(checkpoints["convnext_atto"][1], x)
    out = run_litert(path, x)
    cosine = np.sum(out * reference, axis=1) / np.linalg.norm(out, axis=1)
    print(f"{dtype} LiteRT vs timm: cosine min {cosine.min():.6f}")
    assert cosine.min() >= QUANTIZED_MIN_COSINE[dtype]


@pytest.mark.slow
def test_cli_export_with_normalization_takes_raw_uint8_pixels(
    checkpoints, photos, tmp_path, capsys
):
    """`python -m embedding export --with-normalization --uint8`: the deployed model takes
    resized, cropped RGB bytes and gives timm's embeddings of the normalised images."""
    skip_unless_exportable("onnx")
    folder, timm_model = checkpoints["convnextv2_atto"]
    path = str(tmp_path / "embedder.onnx")
    argv = ["export", "--model", folder, "--no-cache", "-o", path, "--with-normalization"]
    assert embedding_cli.main([*argv, "--uint8"]) == 0
    assert "exported" in capsys.readouterr().out
    with open(path + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["preprocessing"]["normalization_in_graph"] is True
    assert sidecar["input"]["dtype"] == "uint8"
    preprocessor = Preprocessor(sidecar["preprocessing"])
    pixels = np.stack([preprocessor.resize_crop(load_image(image)) for image in photos])
    assert pixels.dtype == np.uint8
    reference = timm_embeddings(timm_model, preprocess(sidecar, photos))
    np.testing.assert_allclose(run_onnx(path, pixels), reference, atol=ATOL, rtol=0)
    np.testing.assert_allclose(run_onnx(path, pixels[:1]), reference[:1], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_weights_convert_cli_exports_the_classifier(checkpoints, photos, tmp_path, capsys):
    """`python -m weights_convert SOURCE -o model.onnx`: timm's logits. The command line's
    wiring is the same on every backend (each backend's exporter is tested above), so
    this runs in the jax session only, where an ONNX export is cheapest."""
    if BACKEND != "jax":
        pytest.skip("the weights_convert export command line is checked in the jax session")
    skip_unless_exportable("onnx")
    folder, timm_model = checkpoints["convnext_atto"]
    path = str(tmp_path / "classifier.onnx")
    assert convert_cli.main([folder, "-o", path, "-q", "--batch-size", "2"]) == 0
    assert "onnx" in capsys.readouterr().out
    with open(path + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["outputs"][0]["kind"] == "logits"
    assert sidecar["input"]["shape"] == [2, SIZE, SIZE, 3]
    x = preprocess(sidecar, photos[:2])
    with torch.no_grad():
        reference = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(run_onnx(path, x), reference, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------
# Normalisation inside the graph, the sidecar, atomic writes (no exporter needed)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def keras_embedder(checkpoints):
    return Embedder(checkpoints["convnext_atto"][0], cache=False)


@pytest.mark.parametrize("input_dtype", ["float32", "uint8"])
def test_normalization_in_graph_equals_the_preprocessor(keras_embedder, photos, input_dtype):
    embedder = keras_embedder
    cfg = embedder.pretrained_cfg
    mean, std = export_module._mean_std(cfg, 3)
    graph = export_module._with_normalization(embedder.model, mean, std, input_dtype)
    pixels = np.stack(
        [embedder.preprocessor.resize_crop(load_image(image)) for image in photos[:3]]
    )
    raw = pixels if input_dtype == "uint8" else pixels.astype(np.float32) / 255.0
    normalised = np.stack([embedder.preprocessor.normalize(p) for p in pixels])
    np.testing.assert_allclose(
        np.asarray(graph.predict_on_batch(raw)),
        np.asarray(embedder.model.predict_on_batch(normalised)),
        atol=1e-5,
    )


def with_metadata(model, metadata):
    """What describe_export reads of `model`, with other metadata."""
    names = ("timm_architecture", "output_shape", "normalize", "num_classes")
    return types.SimpleNamespace(metadata=metadata, **{n: getattr(model, n) for n in names})


def test_sidecar_records_preprocessing_licence_and_calibrated_threshold(keras_embedder):
    calibration = {"kind": "keras-convnext-calibration", "threshold": 0.4125, "far": 0.001}
    sidecar = export_module.describe_export(
        with_metadata(keras_embedder.model, {"calibration": calibration}),
        format="onnx",
        dtype="float32",
        input_shape=(None, SIZE, SIZE, 3),
        input_dtype="float32",
        with_normalization=False,
        pretrained_cfg=keras_embedder.pretrained_cfg,
    )
    assert sidecar["threshold"] == 0.4125 and sidecar["calibration"] == calibration
    cfg = keras_embedder.pretrained_cfg
    prep = sidecar["preprocessing"]
    assert prep["mean"] == list(cfg["mean"]) and prep["std"] == list(cfg["std"])
    assert prep["interpolation"] == cfg["interpolation"] and prep["crop_pct"] == cfg["crop_pct"]
    assert prep["resize_shorter_side_to"] == [int(SIZE / 0.875)] * 2
    assert sidecar["timm_architecture"] == "convnext_atto"
    assert sidecar["license"] == cfg["license"]
    assert sidecar["outputs"][0] == {
        "kind": "embedding",
        "shape": [None, 320],
        "dim": 320,
        "l2_normalized": True,
    }
    assert sidecar["input"]["layout"] == "NHWC"
    assert Preprocessor(prep).config == keras_embedder.preprocessor.config
    json.dumps(sidecar)  # JSON-able as it is


def test_bad_calibration_in_metadata_is_refused(keras_embedder):
    model = with_metadata(keras_embedder.model, {"calibration": {"threshold": "high"}})
    with pytest.raises(ExportError, match="finite 'threshold'"):
        export_module.describe_export(
            model,
            format="onnx",
            dtype="float32",
            input_shape=(None, SIZE, SIZE, 3),
            input_dtype="float32",
            with_normalization=False,
            pretrained_cfg={},
        )


def test_failed_export_leaves_nothing_behind(keras_embedder, tmp_path):
    format = next((f for f in ("onnx", "saved_model", "litert") if not can_export(f)), None)
    if format is None:
        pytest.skip(f"the {BACKEND} backend exports none of onnx, saved_model, litert here")
    path = str(tmp_path / f"embedder{SUFFIX[format]}")

    def fail(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    with (
        mock.patch.object(export_module, "_run_exporter", fail),
        pytest.raises(RuntimeError, match="crashed"),
    ):
        keras_embedder.export(path)
    assert os.listdir(tmp_path) == []


def test_onnx_export_leaves_only_its_files_and_runs_alone(keras_embedder, photos, tmp_path):
    """An exporter's external data (JAX's writes `.NAME.onnx.tmp-*.onnx.data` beside the
    temporary file) goes into the file itself: nothing else is left, and the file runs
    after the folder's other files are gone."""
    if not can_export("onnx"):
        pytest.skip(f"the {BACKEND} backend does not export onnx here")
    path = str(tmp_path / "embedder.onnx")
    keras_embedder.export(path)
    assert sorted(os.listdir(tmp_path)) == ["embedder.onnx", "embedder.onnx.json"]
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.replace(path, moved / "embedder.onnx")
    x = np.stack([keras_embedder.preprocess(image) for image in photos[:2]])
    np.testing.assert_allclose(
        run_onnx(str(moved / "embedder.onnx"), x), keras_embedder.embed(photos[:2]), atol=1e-5
    )


def test_model_built_for_a_fixed_size_exports_only_that_size(tmp_path):
    inputs = keras.Input((96, 96, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    format = next((f for f in ("onnx", "saved_model", "litert") if not can_export(f)), "onnx")
    with pytest.raises(ExportError, match="built for 96x96"):
        export_model(model, str(tmp_path / f"m{SUFFIX[format]}"), input_size=(64, 64))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Refusals: which backend to use, bad options, caught before any work
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "format, backend, advice",
    [
        ("litert", "jax", "use KERAS_BACKEND=tensorflow."),
        ("litert", "torch", "use KERAS_BACKEND=tensorflow."),
        ("saved_model", "torch", "use KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax."),
    ],
)
def test_unavailable_format_names_the_backend_to_use(format, backend, advice):
    with pytest.raises(ExportUnavailableError) as error:
        export_module.check_backend_supports(format, backend)
    assert f"not available on the {backend} backend" in str(error.value)
    assert str(error.value).endswith(advice)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX writes its SavedModels as StableHLO")
def test_jax_saved_model_refused_before_any_export(keras_embedder, tmp_path, capfd):
    """Whether this TensorFlow runs this JAX's SavedModels is found on a small model of a
    ConvNeXt block's layers, quietly and before a model is exported, and agrees with
    the check after a full export (run here with the early one switched off)."""
    late = tmp_path / "late"
    with mock.patch.object(export_module, "_jax_saved_model_problem", lambda: None):
        try:
            keras_embedder.export(str(late) + os.sep)
            refused = None
        except ExportUnavailableError as error:
            refused = str(error)
    capfd.readouterr()
    export_module._jax_saved_model_problem.cache_clear()
    reason = can_export("saved_model")
    logs = capfd.readouterr().err  # file-descriptor level: TensorFlow's C++ logging
    assert "OP_REQUIRES" not in logs and "note: called from" not in logs, logs
    assert (reason is None) == (refused is None), (reason, refused)
    with mock.patch.object(export_writers, "_check_tensorflow_runs", side_effect=AssertionError):
        assert can_export("saved_model") == reason  # the answer, a refusal too, is kept
    if refused is None:
        return  # this TensorFlow runs this JAX's SavedModels (test_reloaded_saved_model...)
    assert "cannot run the SavedModel that JAX" in reason
    with (
        mock.patch.object(export_module, "_run_exporter", side_effect=AssertionError("exported")),
        pytest.raises(ExportUnavailableError, match="cannot run the SavedModel"),
    ):
        keras_embedder.export(str(tmp_path / "early") + os.sep)
    assert os.listdir(tmp_path) == []


def test_missing_exporter_package_is_named():
    with (
        mock.patch.object(export_module.importlib.util, "find_spec", return_value=None),
        pytest.raises(ExportUnavailableError, match="needs jax2onnx, onnx: pip install jax2onnx"),
    ):
        export_module.check_backend_supports("onnx", "jax")


@pytest.mark.parametrize(
    "path, format, expected",
    [
        ("m.onnx", None, "onnx"),
        ("m.tflite", None, "litert"),
        ("m.xml", None, "openvino"),
        ("folder/", None, "saved_model"),
        ("folder", "saved_model", "saved_model"),
    ],
)
def test_format_from_the_path(path, format, expected):
    assert export_module.format_for_path(path, format) == expected


@pytest.mark.parametrize(
    "path, format, options, message",
    [
        ("m.bin", None, {}, "Cannot tell the export format"),
        ("m.onnx", "litert", {}, "written to a .tflite file"),
        ("m.onnx", "tflite", {}, "Unknown export format 'tflite'"),
        ("m.onnx", None, {"dtype": "int8"}, "LiteRT option"),
        ("m.tflite", None, {"dtype": "int4"}, "dtype must be one of float32, float16, int8"),
        ("m.onnx", None, {"input_dtype": "uint8"}, "needs with_normalization"),
        ("m.onnx", None, {"batch_size": 0}, "batch_size must be a positive int"),
        ("m.onnx", None, {"input_size": (64,)}, "input_size must be"),
        ("m.onnx", None, {"input_size": (64, 64), "dynamic_size": True}, "not both"),
    ],
)
def test_bad_options_are_refused(path, format, options, message):
    with pytest.raises(ExportError, match=message):
        format = export_module.format_for_path(path, format)
        export_module.check_export_options(format, **options)


def test_saved_model_never_overwrites_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="other than a SavedModel"):
        export_module.check_output(str(tmp_path), "saved_model")


def _one_error_line(captured) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-o", "m.onnx", "--dtype", "int8"], "LiteRT option"),
        (["-o", "m.onnx", "--uint8"], "needs with_normalization"),
        (["-o", "m.bin", "--format", "onnx"], "written to a .onnx file"),
    ],
)
def test_command_lines_check_export_options_before_loading(extra, message, tmp_path, capsys):
    """The checkpoint does not exist: the option error comes first, nothing is written."""
    missing = str(tmp_path / "no_such_checkpoint")
    extra = [str(tmp_path / a) if a.startswith("m.") else a for a in extra]
    assert convert_cli.main([missing, *extra]) == 2
    assert message in _one_error_line(capsys.readouterr())
    assert embedding_cli.main(["export", "--model", missing, *extra]) == 2
    assert message in _one_error_line(capsys.readouterr())
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", "/"])
def test_command_line_refusal_on_this_backend(suffix, tmp_path, capsys):
    """Where the active backend cannot export a format, one error line names the backend
    to use, before the (missing) checkpoint is read."""
    format = export_module.format_for_path(f"m{suffix}")
    reason = can_export(format)
    if reason is None:
        pytest.skip(f"the {BACKEND} backend exports {format}")
    missing = str(tmp_path / "no_such_checkpoint")
    output = os.path.join(str(tmp_path), f"m{suffix}")  # pathlib would drop the slash
    assert embedding_cli.main(["export", "--model", missing, "-o", output]) == 2
    assert _one_error_line(capsys.readouterr()) == f"error: {reason}"
    assert "KERAS_BACKEND=" in reason or "pip install" in reason


def test_keras_outputs_still_refuse_export_options(tmp_path, capsys):
    assert convert_cli.main([str(tmp_path / "x"), "-o", str(tmp_path / "m.keras"), "--uint8"]) == 2
    assert "export options" in _one_error_line(capsys.readouterr())
    assert convert_cli.main([str(tmp_path / "x"), "-o", str(tmp_path / "m.pt")]) == 2
    assert ".onnx" in _one_error_line(capsys.readouterr())


def test_building_the_command_lines_does_not_import_keras():
    """`python -m embedding --help` stays instant and `--backend` still works: the export
    subcommand's options come from a module that does not import Keras."""
    code = (
        "import sys, embedding.cli, weights_convert.cli; embedding.cli.build_parser(); "
        "weights_convert.cli.add_export_options(__import__('argparse').ArgumentParser()); "
        "print(sorted(m for m in ('keras', 'tensorflow', 'torch', 'jax') if m in sys.modules))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
