"""Face-recognition and greyscale checkpoints end to end through `embedding`: the
`Embedder`, `python -m embedding embed / verify / evaluate / enroll / identify`, and
exports, against timm's own model and timm's own preprocessing.

The face checkpoint is a `convnext_atto` with a 2x2 stem and 512 outputs on 112x112
inputs, mean / std 0.5 (as the published CosFace / ArcFace ConvNeXts are), every
parameter random, written by timm's `save_for_hf`; its embedding is timm's output,
L2-normalised. The greyscale one (`in_chans=1`) embeds with timm's pre-logits.
"""

import json
import os

import numpy as np
import pytest
import skimage.data
import timm
import torch
import torch.nn.functional as F
from conftest import random_timm_model, save_timm_hf
from PIL import Image
from timm.data.model_config import resolve_input_data_config

from embedding import Embedder, Gallery
from embedding import cli as embedding_cli
from embedding.cli import options as cli_options
from weights_convert import export as export_module

ATOL = 1e-5
GREY_ARGS = {"in_chans": 1, "depths": [1, 1, 2, 1], "dims": [16, 24, 32, 40]}
GREY_CFG = {"input_size": (1, 64, 64), "crop_pct": 0.875}


def timm_embedding(checkpoint, image, mode, pre_logits=False):
    """timm's L2-normalised output (or pre-logits) of a (folder, timm model) checkpoint for a
    PIL image: timm's loader's `convert(mode)`, then timm's evaluation transform of the
    pretrained_cfg the folder's config.json holds."""
    folder, timm_model = checkpoint
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)["pretrained_cfg"]
    transform = timm.data.create_transform(
        **resolve_input_data_config(timm_model, pretrained_cfg=cfg)
    )
    x = transform(image.convert(mode))[None]
    with torch.no_grad():
        features = timm_model.forward_features(x)
        out = timm_model.forward_head(features, pre_logits=pre_logits)
    return F.normalize(out, dim=-1).numpy()


@pytest.fixture(scope="module")
def face_embedder(timm_face_checkpoint):  # batches padded to 1, 2 or 4 images
    return Embedder(timm_face_checkpoint[0], cache=False, batch_size=4)


@pytest.fixture(scope="module")
def grey_checkpoint(tmp_path_factory):
    model = random_timm_model("convnext_atto", seed=21, **GREY_ARGS)
    folder = tmp_path_factory.mktemp("grey_checkpoint")
    return save_timm_hf(model, folder, GREY_ARGS, GREY_CFG), model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """PEOPLE/alice: two photos of the astronaut; PEOPLE/bob: the mirrored astronaut, twice;
    an LFW-style pairs file over them."""
    root = tmp_path_factory.mktemp("people")
    astronaut = skimage.data.astronaut()
    small = np.asarray(Image.fromarray(astronaut).resize((384, 384)))
    for name, images in (
        ("alice", [astronaut, small]),
        ("bob", [astronaut[:, ::-1], small[:, ::-1]]),
    ):
        (root / name).mkdir()
        for k, image in enumerate(images, start=1):
            Image.fromarray(np.ascontiguousarray(image)).save(
                root / name / f"{name}_{k:04d}.jpg", quality=95
            )
    pairs = root / "pairs.txt"
    pairs.write_text("2 1\nalice 1 2\nalice 1 bob 1\nbob 1 2\nalice 2 bob 2\n")  # 2 folds
    return root, pairs


def test_face_checkpoint_embeds_a_photograph_as_timm(timm_face_checkpoint, face_embedder):
    photo = Image.fromarray(skimage.data.astronaut())
    assert face_embedder.dim == 512
    assert face_embedder.preprocessor.config.input_size == (112, 112)
    assert face_embedder.model.convnext_config.patch_size == 2
    expected = timm_embedding(timm_face_checkpoint, photo, "RGB")
    np.testing.assert_allclose(face_embedder.embed(photo), expected, atol=ATOL, rtol=0)
    # timm's pre-logits stay available where they are wanted
    pre_logits = Embedder(timm_face_checkpoint[0], cache=False, head="pre_logits")
    np.testing.assert_allclose(
        pre_logits.embed(photo),
        timm_embedding(timm_face_checkpoint, photo, "RGB", pre_logits=True),
        atol=ATOL,
        rtol=0,
    )
    with pytest.raises(ValueError, match="head='pre_logits'"):
        Embedder(timm_face_checkpoint[0], cache=False, pooling="max")


@pytest.mark.once("jax")  # command-line plumbing: the Embedder test above runs on every backend
def test_face_checkpoint_through_the_command_lines(
    timm_face_checkpoint, face_embedder, photos, tmp_path, capsys, monkeypatch
):
    """embed (its vectors equal timm's), verify, evaluate, enroll + identify: the model each
    command builds from `--model` is built once here and reused by the next ones."""
    folder, _ = timm_face_checkpoint
    root, pairs = photos
    built = {}
    make = cli_options.make_embedder
    monkeypatch.setattr(
        cli_options, "make_embedder", lambda args, **k: built.setdefault("e", make(args, **k))
    )
    common = ["--model", folder, "--no-cache", "--no-progress"]
    out = tmp_path / "faces.npz"
    assert embedding_cli.main(["embed", str(root / "alice"), "-o", str(out), *common]) == 0
    assert "2 embeddings of dim 512" in capsys.readouterr().out
    first = root / "alice" / "alice_0001.jpg"
    with np.load(out, allow_pickle=False) as data:
        index = [os.path.basename(p) for p in data["paths"].tolist()].index(first.name)
        vector = data["embeddings"][index]
    with Image.open(first) as image:
        expected = timm_embedding(timm_face_checkpoint, image, "RGB")[0]
    np.testing.assert_allclose(vector, expected, atol=ATOL)

    assert embedding_cli.main(["verify", str(first), str(first), *common]) == 0
    assert "similarity: 1.0000" in capsys.readouterr().out
    assert embedding_cli.main(["evaluate", str(pairs), "--root", str(root), *common]) == 0
    assert "EER:" in capsys.readouterr().out

    gallery = tmp_path / "gallery.npz"
    assert embedding_cli.main(["enroll", str(root), "-o", str(gallery), *common]) == 0
    assert "(dim 512)" in capsys.readouterr().out
    assert Gallery.load(gallery).dim == 512
    assert embedding_cli.main(["identify", str(first), "--gallery", str(gallery), *common]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("face ")]
    assert lines and "best alice similarity 1.000000 MATCH" in lines[0]


def test_greyscale_checkpoint_embeds_grey_images_as_timm(grey_checkpoint):
    folder, _ = grey_checkpoint
    embedder = Embedder(folder, cache=False)
    assert embedder.model.input_shape == (None, None, None, 1)
    camera = skimage.data.camera()  # (512, 512) uint8 grey
    assert embedder.preprocess(camera).shape == (64, 64, 1)  # one channel, not three
    expected = timm_embedding(grey_checkpoint, Image.fromarray(camera), "L", pre_logits=True)
    np.testing.assert_allclose(embedder.embed(camera), expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(embedder.embed(Image.fromarray(camera)), expected, atol=ATOL, rtol=0)
    # a colour photograph becomes luma, as timm's loader's convert("L")
    coffee = Image.fromarray(skimage.data.coffee())
    np.testing.assert_allclose(
        embedder.embed(coffee),
        timm_embedding(grey_checkpoint, coffee, "L", True),
        atol=ATOL,
        rtol=0,
    )
    floats = np.asarray(coffee, dtype=np.float32) / 255.0  # float RGB: the same luma weights
    np.testing.assert_allclose(embedder.embed(floats), embedder.embed(coffee), atol=2e-2)


@pytest.mark.once("torch")  # preprocessing and the graph's affine layer: numpy-exact
def test_greyscale_normalization_in_the_export_graph(grey_checkpoint):
    embedder = Embedder(grey_checkpoint[0], cache=False)
    mean, std = export_module._mean_std(embedder.pretrained_cfg, 1)
    assert len(mean) == len(std) == 1
    graph = export_module._with_normalization(embedder.model, mean, std, "uint8")
    pixels = embedder.preprocessor.resize_crop(embedder.preprocessor.load(skimage.data.camera()))
    np.testing.assert_allclose(
        graph.predict_on_batch(pixels[None]),
        embedder.model.predict_on_batch(embedder.preprocessor.normalize(pixels)[None]),
        atol=1e-5,
    )
    description = export_module.describe_export(
        embedder.model, format="onnx", dtype="float32", input_shape=(None, 64, 64, 1),
        input_dtype="uint8", with_normalization=True, pretrained_cfg=embedder.pretrained_cfg,
    )  # fmt: skip
    assert description["input"]["channel_order"] == "grey"
    assert description["preprocessing"]["mean"] == [pytest.approx(0.449, abs=1e-3)]


@pytest.mark.slow
@pytest.mark.once("torch")  # one exporter suffices: the channels are the graph's input shape
def test_greyscale_onnx_export_matches(grey_checkpoint, tmp_path):
    import onnxruntime

    embedder, image = Embedder(grey_checkpoint[0], cache=False), skimage.data.camera()
    path = tmp_path / "grey.onnx"
    description = embedder.export(str(path), with_normalization=True, input_dtype="uint8")
    pixels = embedder.preprocessor.resize_crop(embedder.preprocessor.load(image))  # (64, 64, 1)
    session = onnxruntime.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: pixels[None]})
    np.testing.assert_allclose(got, embedder.embed(image), atol=1e-4)
    assert (
        description["input"]["shape"][-1] == 1 and description["input"]["channel_order"] == "grey"
    )
    with open(export_module.export_sidecar_path(str(path))) as f:
        assert json.load(f)["input"]["shape"] == description["input"]["shape"]
