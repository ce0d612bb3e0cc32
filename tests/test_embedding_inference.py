"""The inference settings a service uses: bfloat16 (`Embedder(..., dtype="bfloat16")`,
`--dtype bfloat16`) against timm in float32 on photographs and what it does to
verification decisions, and the warm-up that keeps compilation off requests."""

import numpy as np
import pytest
import skimage.data
import skimage.transform
import torch
from conftest import BACKEND

from convnext_layers import ModelArgumentError, fast_ops
from convnext_layers import plan as plan_module
from embedding import Embedder
from embedding import cli as embedding_cli
from embedding.model import in_dtype

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry")
MIN_COSINE = 0.999  # the bar for bfloat16 embeddings on photographs


def timm_embeddings(timm_model, embedder, images):
    """timm's float32 pre-logits features, L2-normalised, of `embedder`'s preprocessed images."""
    x = np.stack([embedder.preprocess(image) for image in images])
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        out = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(out, dim=1).numpy()


@pytest.mark.parametrize("fixture", ["timm_atto_checkpoint", "timm_v2_atto_checkpoint"])
def test_bfloat16_embeddings_are_within_cosine_of_timm_float32(fixture, request):
    folder, timm_model = request.getfixturevalue(fixture)
    embedder = Embedder(folder, batch_size=8, cache=False, dtype="bfloat16")
    body = embedder.model.get_layer("stage1_block0_pwconv1")
    assert (body.compute_dtype, body.variable_dtype) == ("bfloat16", "bfloat16")
    for name in ("head_norm", "embedding_l2"):
        assert embedder.model.get_layer(name).compute_dtype == "float32", name
    images = [getattr(skimage.data, name)() for name in PHOTOS]
    got = embedder.embed(images)
    expected = timm_embeddings(timm_model, embedder, images)
    assert got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)  # L2 in float32
    cosines = np.sum(got * expected, axis=1)
    print(f"{fixture} on {BACKEND}: cosine to timm float32 {cosines.min():.5f}-{cosines.max():.5f}")
    assert cosines.min() >= MIN_COSINE, dict(zip(PHOTOS, cosines.round(5), strict=True))
    # not float32 in disguise: bfloat16 keeps 8 significant bits (JAX on a CPU computes
    # a bfloat16 model's body in float32 from its bfloat16 weights, "jax_float32_compute",
    # so there the bfloat16 arithmetic is checked through the portable call)
    if BACKEND == "jax":
        with fast_ops.portable():
            got = embedder.embed(images)
        cosines = np.sum(got * expected, axis=1)
        assert cosines.min() >= MIN_COSINE, dict(zip(PHOTOS, cosines.round(5), strict=True))
    assert cosines.min() < 1 - 1e-7


def _views(image, count, rng):
    """`count` views of one photograph: random crops of 70-95 % of it, some mirrored."""
    height, width = image.shape[:2]
    views = []
    for _ in range(count):
        scale = rng.uniform(0.7, 0.95)
        h, w = int(height * scale), int(width * scale)
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        view = image[top : top + h, left : left + w]
        views.append(view[:, ::-1] if rng.random() < 0.5 else view)
    return views


@pytest.mark.slow
def test_bfloat16_flips_only_decisions_at_the_threshold(timm_atto_checkpoint):
    """Pairs of views of one photograph (genuine) and of two (impostor), thresholded at
    float32's equal-error-rate threshold: a decision bfloat16 changes must be one whose
    float32 score lies within bfloat16's score error of the threshold."""
    folder, _ = timm_atto_checkpoint
    rng = np.random.default_rng(7)
    images, owners = [], []
    for index, name in enumerate(PHOTOS):
        image = getattr(skimage.data, name)()
        if image.shape[0] < 300:  # the small ones upsized, so crops stay photographs
            image = skimage.transform.rescale(
                image, 2, channel_axis=-1 if image.ndim == 3 else None
            )
        views = _views(np.asarray(image), 5, rng)
        images += views
        owners += [index] * len(views)
    owners = np.asarray(owners)
    first, second = np.triu_indices(len(images), k=1)
    labels = owners[first] == owners[second]
    scores = {}
    for dtype in ("float32", "bfloat16"):
        embedder = Embedder(folder, batch_size=8, cache=False, dtype=dtype)
        vectors = embedder.embed(images)
        scores[dtype] = np.sum(vectors[first] * vectors[second], axis=1)
    reference = Embedder(folder, batch_size=8, cache=False)
    reference.calibrate(scores["float32"], labels)  # the EER threshold
    threshold = reference.threshold
    decisions = {dtype: s >= threshold for dtype, s in scores.items()}
    flipped = decisions["float32"] != decisions["bfloat16"]
    error = np.abs(scores["bfloat16"] - scores["float32"])
    print(
        f"{BACKEND}: {flipped.sum()} of {len(labels)} decisions flip at the EER threshold "
        f"{threshold:.4f} ({labels.sum()} genuine pairs); score error max {error.max():.2e}, "
        f"median {np.median(error):.2e}"
    )
    assert labels.sum() == len(PHOTOS) * 10
    assert error.max() < 0.01
    near = np.abs(scores["float32"] - threshold) <= error.max()
    assert not (flipped & ~near).any()


def test_in_dtype_keeps_or_casts_and_refuses_what_it_cannot(small_checkpoint, tmp_path):
    import keras

    folder = small_checkpoint[0]
    embedder = Embedder(folder, batch_size=4, cache=False)
    model = embedder.model
    assert in_dtype(model, "float32") is model
    cast = in_dtype(model, "bfloat16")
    assert cast.get_config()["dtype"] == "bfloat16" and in_dtype(cast, "bfloat16") is cast
    for a, b in zip(model.weights, cast.weights, strict=True):
        want = keras.ops.convert_to_numpy(a).astype("float32")
        got = keras.ops.convert_to_numpy(keras.ops.cast(b, "float32"))
        np.testing.assert_allclose(got, want, rtol=2**-8, atol=0, err_msg=a.path)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        Embedder(folder, cache=False, dtype="float16")
    with pytest.raises(ValueError, match="computes in bfloat16; export a float32 one"):
        Embedder(model=cast, dtype="bfloat16").export(tmp_path / "model.onnx")
    assert not list(tmp_path.iterdir())
    plain = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    with pytest.raises(ValueError, match="needs a ConvNeXt model"):
        in_dtype(plain, "bfloat16")


def test_cli_dtype_bfloat16(small_checkpoint, tmp_path, capsys):
    """embed and verify take --dtype; embed's vectors agree with float32's within the bar."""
    folder = small_checkpoint[0]
    image = tmp_path / "astronaut.png"
    skimage.io.imsave(image, skimage.data.astronaut(), check_contrast=False)
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = tmp_path / f"{dtype}.npz"
        code = embedding_cli.main(
            ["embed", str(image), "-o", str(out[dtype]), "--model", folder, "--no-cache",
             "--no-progress", "--dtype", dtype]
        )  # fmt: skip
        assert code == 0, capsys.readouterr().err
    vectors = {dtype: np.load(path)["embeddings"][0] for dtype, path in out.items()}
    cosine = float(vectors["float32"] @ vectors["bfloat16"])
    assert cosine >= MIN_COSINE
    if BACKEND != "jax":  # JAX on a CPU computes in float32 ("jax_float32_compute")
        assert cosine < 1 - 1e-7
    code = embedding_cli.main(
        ["verify", str(image), str(image), "--model", folder, "--no-cache", "--dtype", "bfloat16"]
    )
    assert code == 0 and "similarity: 1.0000" in capsys.readouterr().out
    code = embedding_cli.main(["verify", str(image), str(image), "--dtype", "float16"])
    err = capsys.readouterr().err
    assert code == 2 and "--dtype" in err and "bfloat16" in err


@pytest.mark.slow  # JAX compiles three executables
def test_warmup_compiles_every_batch_size_embed_runs(small_checkpoint, monkeypatch):
    """After `Embedder.warm_up()`, embedding 1-5 images (batches padded to 1, 2, 4 and 4 + 1)
    traces nothing new on JAX and TensorFlow (the model's Python call runs only while
    a jit / tf.function traces); torch runs eagerly, nothing to compile."""
    embedder = Embedder(small_checkpoint[0], batch_size=4, cache=False, dtype="bfloat16")
    assert embedder.warm_up() == [1, 2, 4]
    images = [skimage.data.astronaut()[::4, ::4]] * 5
    calls = []
    run = plan_module.LayerPlan.run
    monkeypatch.setattr(
        plan_module.LayerPlan, "run", lambda *a, **k: calls.append(1) or run(*a, **k)
    )
    for count in range(1, 6):
        assert embedder.embed(images[:count]).shape == (count, 320)
    if BACKEND in ("jax", "tensorflow"):
        assert calls == [], f"{len(calls)} traces after warmup"
    else:
        assert len(calls) == 6  # the eager call, once per batch


def test_model_warmup_needs_a_size_when_the_model_takes_any(small_checkpoint):
    model = Embedder(small_checkpoint[0], cache=False).model
    assert model.input_shape[1:3] == (None, None)
    with pytest.raises(ModelArgumentError, match="warmup needs image_size"):
        model.warmup([1])
    assert list(model.warmup([2], image_size=(40, 48))) == [2]
