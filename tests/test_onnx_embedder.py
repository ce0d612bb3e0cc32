"""`embedding.onnx_embedder`: an exported `.onnx` embedding model run by onnxruntime with the
preprocessing of its sidecar, against `Embedder` on the same checkpoint (1e-5); served by
`python -m embedding serve` in a process that cannot import Keras or any backend; a
hand-built graph for the sidecar's other input kinds (uint8 pixels with the normalisation
inside, a fixed batch, features not yet L2-normalised); the refusals."""

import json
import os

import numpy as np
import onnx
import pytest
import requests
from conftest import ServerProcess, photo, run_python
from onnx import TensorProto, helper
from PIL import Image

from embedding import Embedder
from embedding.errors import ModelSourceError
from embedding.onnx_embedder import OnnxEmbedder
from embedding.preprocess import Preprocessor

pytestmark = [pytest.mark.once("tensorflow"), pytest.mark.slow]  # one export, one backend
PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # camera is grey
TOL = 1e-5


def read_bytes(path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


@pytest.fixture(scope="module")
def exported(small_checkpoint, tmp_path_factory):
    """(the .onnx path, the Keras Embedder it was exported from)."""
    embedder = Embedder(small_checkpoint[0], cache=False)
    path = str(tmp_path_factory.mktemp("onnx") / "embedder.onnx")
    embedder.export(path)
    return path, embedder


def test_onnx_embedder_equals_the_keras_embedder(exported):
    path, embedder = exported
    images = [photo(name) for name in PHOTOS]
    onnx_embedder = OnnxEmbedder(path, batch_size=3)
    assert onnx_embedder.dim == embedder.dim
    assert onnx_embedder.warm_up() == [1, 3]
    np.testing.assert_allclose(
        onnx_embedder.embed(images), embedder.embed(images), atol=TOL, rtol=0
    )


def test_onnx_embedder_loads_without_keras(exported):
    code = """
    import sys
    for name in ("keras", "tensorflow", "jax", "torch"):
        sys.modules[name] = None
    import json, numpy as np, skimage.data
    from embedding.onnx_embedder import OnnxEmbedder
    vectors = OnnxEmbedder(sys.argv[1]).embed([skimage.data.astronaut()])
    print("RESULT" + json.dumps(vectors.tolist()))
    """
    proc = run_python(code, exported[0], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    served = np.asarray(json.loads(line[len("RESULT") :]), dtype=np.float32)
    np.testing.assert_allclose(served, exported[1].embed(photo("astronaut")), atol=TOL, rtol=0)


def test_the_onnx_model_served_without_keras_equals_the_keras_one(exported, tmp_path):
    for module in ("fastapi", "uvicorn"):  # the serve extra; .ci/run installs it
        pytest.importorskip(module, reason='the serve extra: pip install -e ".[serve]"')
    path, embedder = exported
    files = []
    for name in PHOTOS:
        file = tmp_path / f"{name}.png"
        Image.fromarray(photo(name)).save(file)
        files.append(str(file))
    server = ServerProcess(
        ["--model", path, "--max-batch", 4], tmp_path / "log", without_keras=True
    )
    try:
        server.wait_ready(120)
        upload = [("images", (os.path.basename(f), read_bytes(f))) for f in files]
        response = requests.post(server.url + "/v1/embed", files=upload, timeout=60)
        assert response.status_code == 200, response.text
        served = np.asarray(response.json()["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(served, embedder.embed(files), atol=TOL, rtol=0)
        faces = requests.post(
            server.url + "/v1/embed", files=upload[:1], params={"faces": "true"}, timeout=60
        )
        (face,) = faces.json()["embeddings"][0]
        expected = embedder.embed_faces(files[0])[0]
        np.testing.assert_allclose(face["embedding"], expected.embedding, atol=TOL, rtol=0)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


# ----------------------------------------------------------------------------
# A hand-made graph: uint8 pixels in, normalisation inside, fixed batch, features out
# ----------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def channel_means_onnx(path, batch):
    """(batch, 16, 16, 3) uint8 -> ((x / 255 - mean) / std averaged over H, W) (batch, 3)."""
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["x01"]),
        helper.make_node("Sub", ["x01", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["normal"]),
        helper.make_node("ReduceMean", ["normal", "axes"], ["features"], keepdims=0),
    ]
    initializers = [
        helper.make_tensor("c255", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("mean", TensorProto.FLOAT, [3], MEAN),
        helper.make_tensor("std", TensorProto.FLOAT, [3], STD),
        helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "channel_means",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, 16, 16, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, 3])],
        initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    preprocessing = {
        "input_size": [16, 16], "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": list(MEAN), "std": list(STD), "normalization_in_graph": True,
    }  # fmt: skip
    sidecar = {
        "kind": "keras-convnext-export", "format": 1,
        "input": {"name": "image", "shape": [batch, 16, 16, 3], "dtype": "uint8"},
        "preprocessing": preprocessing,
        "outputs": [{"kind": "features", "dim": 3, "l2_normalized": False}],
        "threshold": 0.25, "pretrained_cfg": {},
    }  # fmt: skip
    with open(path + ".json", "w") as file:
        json.dump(sidecar, file)
    return preprocessing


def test_uint8_input_fixed_batch_and_features_are_normalised(tmp_path):
    path = str(tmp_path / "means.onnx")
    preprocessing = channel_means_onnx(path, batch=2)
    images = [photo(name) for name in ("astronaut", "coffee", "chelsea")]  # 3: two calls
    embedder = OnnxEmbedder(path, batch_size=2)
    assert embedder.threshold == 0.25 and embedder.threshold_source == "calibrated"
    preprocessor = Preprocessor(preprocessing)
    expected = np.stack(
        [
            preprocessor.normalize(preprocessor.resize_crop(preprocessor.load(i))).mean(axis=(0, 1))
            for i in images
        ]  # fmt: skip
    )
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder.embed(images), expected, atol=1e-5, rtol=0)


def test_refusals(tmp_path, exported):
    missing = tmp_path / "alone.onnx"
    missing.write_bytes(read_bytes(exported[0]))
    with pytest.raises(ModelSourceError, match="no sidecar"):
        OnnxEmbedder(missing)
    (tmp_path / "alone.onnx.json").write_text('{"kind": "something else"}')
    with pytest.raises(ModelSourceError, match="not a keras-convnext export sidecar"):
        OnnxEmbedder(missing)
    sidecar = json.loads(read_bytes(exported[0] + ".json"))
    sidecar["outputs"][0]["kind"] = "logits"
    (tmp_path / "alone.onnx.json").write_text(json.dumps(sidecar))
    with pytest.raises(ModelSourceError, match="not an embedding"):
        OnnxEmbedder(missing)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    (tmp_path / "broken.onnx.json").write_text(json.dumps({**sidecar, "outputs": [
        {"kind": "embedding", "dim": 320}]}))  # fmt: skip
    with pytest.raises(ModelSourceError, match="onnxruntime cannot load it"):
        OnnxEmbedder(broken)
    with pytest.raises(ModelSourceError, match="onnxruntime, not Keras"):
        Embedder(str(missing))
