"""The `embedding` package: preprocessing, model, Embedder, CLI (metrics and gallery:
test_embedding_metrics.py; cross-backend and README: test_embedding_backends.py)."""

import io
import json
import os
import pathlib

import keras
import numpy as np
import pytest
import skimage.data
import torch
from conftest import SMALL_SIZE
from PIL import Image
from timm.data import create_transform, resolve_data_config

import embedding
import weights_convert
from convnext_layers import fast_ops
from embedding import (
    Embedder,
    GeneralizedMeanPooling,
    ImageLoadError,
    Preprocessor,
    build_model,
    compute_embedding,
    embedding_dim,
)
from embedding import cli as embedding_cli
from embedding import model as model_module
from embedding.model import padded_size


def photo(name):
    return getattr(skimage.data, name)()


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "logo", "page", "text"]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Keep the converted-model cache out of the home folder."""
    folder = str(tmp_path_factory.mktemp("keras_convnext_cache"))
    saved = os.environ.get(model_module.CACHE_ENV)
    os.environ[model_module.CACHE_ENV] = folder
    yield folder
    if saved is None:
        os.environ.pop(model_module.CACHE_ENV, None)
    else:
        os.environ[model_module.CACHE_ENV] = saved


@pytest.fixture(scope="session")
def small_embedder(small_checkpoint):
    return Embedder(small_checkpoint[0], batch_size=4, cache=False)


def timm_embedding(timm_model, x_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        out = timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)
        return torch.nn.functional.normalize(out, dim=1).numpy()


# ----------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------

PREPROCESS_CFGS = [
    dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic"),  # convnext_atto
    dict(input_size=(3, 288, 288), crop_pct=1.0, interpolation="bicubic"),  # test size
    dict(input_size=(3, 224, 224), crop_pct=0.95, interpolation="bilinear"),
    dict(input_size=(3, 160, 192), crop_pct=0.9, interpolation="bicubic"),  # non-square
    dict(input_size=(3, 600, 600), crop_pct=0.875, interpolation="lanczos"),  # upsampling + pad
    dict(input_size=(3, 64, 64), crop_pct=0.875, interpolation="bilinear", crop_mode="squash"),
]


@pytest.mark.parametrize("cfg", PREPROCESS_CFGS, ids=lambda c: "x".join(map(str, c["input_size"])))
def test_preprocess_matches_timm_eval_transform(cfg):
    cfg = {**cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    transform = create_transform(**resolve_data_config({}, pretrained_cfg=cfg))
    preprocessor = Preprocessor(cfg)
    for name in PHOTOS:  # RGB of several sizes, grey (camera, page, text), RGBA (logo)
        image = Image.fromarray(photo(name))
        expected = transform(image.convert("RGB")).numpy().transpose(1, 2, 0)
        got = preprocessor(image)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=name)


def test_preprocess_default_is_timm_resolve_data_config_of_model(small_checkpoint):
    _, timm_model = small_checkpoint
    transform = create_transform(**resolve_data_config({}, model=timm_model))
    image = Image.fromarray(photo("chelsea"))
    expected = transform(image).numpy().transpose(1, 2, 0)
    got = Preprocessor(timm_model.pretrained_cfg)(image)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_input_kinds_give_the_same_tensor(tmp_path):
    pre = Preprocessor({"input_size": (3, 96, 96)})
    rgb = photo("coffee")
    path = tmp_path / "coffee.png"
    Image.fromarray(rgb).save(path)
    reference = pre(Image.fromarray(rgb))
    with open(path, "rb") as f:
        data = f.read()
    for item in (str(path), path, data, io.BytesIO(data), rgb, Image.fromarray(rgb)):
        np.testing.assert_array_equal(pre(item), reference)
    np.testing.assert_array_equal(pre(rgb[:, :, ::-1], channel_order="bgr"), reference)
    bgra = np.concatenate([rgb[:, :, ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], 2)
    np.testing.assert_array_equal(pre(bgra, channel_order="bgr"), reference)
    # float input in [0, 1] is resized without 8-bit rounding: equal up to that rounding
    np.testing.assert_allclose(pre(rgb / 255.0), reference, atol=0.05)
    grey = photo("camera")
    np.testing.assert_array_equal(pre(grey), pre(Image.fromarray(grey).convert("RGB")))
    np.testing.assert_array_equal(pre(grey[:, :, None]), pre(grey))


def test_bad_inputs_name_the_input(tmp_path):
    pre = Preprocessor({"input_size": (3, 32, 32)})
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(photo("astronaut")).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    cases = [
        (str(corrupt), "corrupt.jpg"),
        (truncated, "truncated.png"),
        (str(tmp_path / "missing.jpg"), "missing.jpg"),
        (b"garbage", "bytes"),
        (12345, "int"),
        (np.zeros((3, 32, 4), np.uint8), "ambiguous"),  # 3x32 RGBA or channels-first 32x4
        (np.full((8, 8, 3), 2.0), "[0, 1]"),
        (np.zeros((8, 8, 3), np.int64), "dtype"),
    ]
    for item, fragment in cases:
        with pytest.raises(ImageLoadError) as info:
            pre(item, index=7)
        assert fragment in str(info.value) and "#7" in str(info.value)
        assert info.value.index == 7
    with pytest.raises(ValueError):
        pre(photo("coffee"), channel_order="bgra")


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["timm_atto_checkpoint", "timm_v2_atto_checkpoint"])
def test_compute_embedding_matches_timm_pre_logits(fixture, request):
    folder, timm_model = request.getfixturevalue(fixture)
    model = build_model(folder, cache=False)
    assert model.output_shape == (None, 320) and embedding_dim(model) == 320
    assert model.input_shape == (None, None, None, 3)
    pre = Preprocessor(model.pretrained_cfg)
    x = np.stack([pre(photo(n)) for n in ("rocket", "camera")])  # RGB and grey
    expected = timm_embedding(timm_model, x)
    got = compute_embedding(model, x)
    assert got.dtype == np.float32 and got.shape == (2, 320)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    single = compute_embedding(model, x[1])  # (H, W, 3) -> (1, D)
    assert single.shape == (1, 320)
    np.testing.assert_allclose(single[0], got[1], atol=1e-6)
    print(f"{fixture}: max abs diff vs timm {np.abs(got - expected).max():.2e}")
    chunked = compute_embedding(model, x, batch_size=1)
    np.testing.assert_allclose(chunked, got, atol=1e-6)


def test_pooling_options_and_head_norm_switch(small_checkpoint):
    folder, timm_model = small_checkpoint
    pre = Preprocessor({"input_size": (3, SMALL_SIZE, SMALL_SIZE)})
    x = np.stack([pre(photo(n)) for n in ("coffee", "chelsea")])
    with torch.no_grad():
        features = timm_model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    pooled = {
        "max": features.amax(dim=(2, 3), keepdim=True),
        "gem": features.clamp(min=1e-6).pow(3).mean(dim=(2, 3), keepdim=True).pow(1 / 3),
    }
    for pooling, value in pooled.items():
        model = build_model(folder, pooling=pooling, cache=False)
        with torch.no_grad():
            expected = timm_model.head.norm(value).flatten(1)
        expected = torch.nn.functional.normalize(expected, dim=1).numpy()
        np.testing.assert_allclose(compute_embedding(model, x), expected, atol=1e-5)
    raw = build_model(folder, head_norm=False, normalize=False, cache=False)
    assert [layer.name for layer in raw.layers][-1] == "head_pool"
    np.testing.assert_allclose(
        compute_embedding(raw, x), features.mean(dim=(2, 3)).numpy(), atol=1e-5
    )
    with pytest.raises(ValueError, match="pooling"):
        build_model(folder, pooling="median", cache=False)


def test_gem_layer_is_registered_and_round_trips(small_checkpoint, tmp_path):
    import keras

    assert keras.saving.get_registered_object("embedding>GeneralizedMeanPooling") is (
        GeneralizedMeanPooling
    )
    model = build_model(small_checkpoint[0], pooling="gem", gem_p=2.5, cache=False)
    gem = model.get_layer("head_pool")
    assert isinstance(gem, GeneralizedMeanPooling) and gem.trainable_weights
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gem.p), 2.5)
    path = str(tmp_path / "gem.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, SMALL_SIZE, SMALL_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(compute_embedding(loaded, x), compute_embedding(model, x), atol=1e-6)


def test_model_cache_skips_conversion(small_checkpoint, tmp_path, monkeypatch):
    folder = small_checkpoint[0]
    cache = tmp_path / "cache"
    first = build_model(folder, cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 1 and not list(cache.glob(".*.tmp-*"))

    def no_conversion(source):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_module, "load_checkpoint", no_conversion)
    second = build_model(folder, cache_dir=cache)
    assert type(second).__name__ == "ConvNeXt" and second.timm_architecture == "convnext_atto"
    assert second.pretrained_cfg["input_size"] == [3, SMALL_SIZE, SMALL_SIZE] or tuple(
        second.pretrained_cfg["input_size"]
    ) == (3, SMALL_SIZE, SMALL_SIZE)
    x = np.random.default_rng(1).normal(size=(1, SMALL_SIZE, SMALL_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(compute_embedding(second, x), compute_embedding(first, x), atol=1e-6)
    # other options, or a changed file, are other entries
    with pytest.raises(AssertionError, match="converted again"):
        build_model(folder, cache_dir=cache, pooling="max")
    weights = pathlib.Path(folder) / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        with pytest.raises(AssertionError, match="converted again"):
            build_model(folder, cache_dir=cache)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_hub_source_without_network_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(weights_convert, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty Hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(embedding.ModelUnavailableError, match="local checkpoint"):
        build_model("timm/convnext_atto.d2_in1k", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        build_model(str(tmp_path / "nowhere"), cache=False)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(FileNotFoundError, match="looping symbolic link"):
        Embedder(str(loop))
    for wrong in (None, 5, b"timm/convnext_atto.d2_in1k"):
        with pytest.raises(TypeError, match="A model source is a path .* got"):
            Embedder(wrong)


def test_padded_sizes_are_powers_of_two_capped_where_each_size_compiles():
    compiled = [padded_size(n, 32, compiles_per_size=True) for n in (1, 2, 3, 5, 17, 32)]
    assert compiled == [1, 2, 4, 8, 32, 32]
    assert padded_size(20, 24, compiles_per_size=True) == 24
    assert [padded_size(n, 32, compiles_per_size=False) for n in (1, 3, 17, 32)] == [1, 3, 17, 32]
    assert padded_size(40, 32, compiles_per_size=True) == 40  # never fewer rows than given
    # JAX's jit compiles per batch size; TensorFlow's trace leaves it open, torch is eager
    assert fast_ops.compiles_per_batch_size() == (keras.backend.backend() == "jax")


def test_batches_run_unpadded_where_the_backend_does_not_compile_per_size(
    small_checkpoint, monkeypatch
):
    """The model sees 3 rows for 3 images on TensorFlow and torch (a padded row costs
    as much as an image), 4 on JAX (one compiled shape per power of two)."""
    embedder = Embedder(small_checkpoint[0], batch_size=8, cache=False)
    seen = []
    run = embedder.model.predict_batch
    monkeypatch.setattr(embedder.model, "predict_batch", lambda x: seen.append(len(x)) or run(x))
    embedder.embed([skimage.data.astronaut()[::8, ::8]] * 3)
    assert seen == ([4] if keras.backend.backend() == "jax" else [3])


# ----------------------------------------------------------------------------
# Embedder
# ----------------------------------------------------------------------------


def test_embedder_inputs_batches_and_errors(small_embedder, tmp_path):
    emb = small_embedder
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "logo"]
    arrays = [photo(n) for n in names]
    path = tmp_path / "astro.jpg"
    Image.fromarray(arrays[0]).save(path, quality=95)
    inputs = [str(path), path, Image.fromarray(arrays[1]), *arrays[2:]]
    vectors = emb.embed(inputs)  # 7 inputs, batch 4: one full batch + a padded one
    assert vectors.shape == (7, emb.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(vectors[0], vectors[1])  # str and Path
    for i in (0, 3, 6):  # single image == its row in the batch
        np.testing.assert_allclose(emb.embed(inputs[i])[0], vectors[i], atol=1e-6)
    direct = compute_embedding(emb.model, np.stack([emb.preprocess(a) for a in arrays[2:]]))
    np.testing.assert_allclose(direct, vectors[3:], atol=1e-6)
    np.testing.assert_allclose(
        emb.embed(arrays[2][:, :, ::-1], channel_order="bgr")[0], vectors[3], atol=1e-6
    )
    stacked = np.stack([arrays[0], arrays[0][:, ::-1]])  # (N, H, W, C) array = a batch
    assert emb.embed(stacked).shape == (2, emb.dim)

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    mixed = [arrays[1], str(bad), arrays[2], object(), arrays[3]]
    result = emb.embed_many(mixed, on_error="skip")
    assert result.indices.tolist() == [0, 2, 4] and result.skipped == [1, 3]
    assert "bad.jpg" in str(result.failures[0]) and "object" in str(result.failures[1])
    np.testing.assert_allclose(result.vectors, vectors[[2, 3, 4]], atol=1e-6)
    with pytest.raises(ImageLoadError, match=r"#1 .*bad\.jpg"):
        emb.embed(mixed)
    with pytest.warns(UserWarning, match="Skipped 2"):
        assert emb.embed(mixed, on_error="skip").shape == (3, emb.dim)
    with pytest.raises(ValueError, match="empty"):
        emb.embed([])


def test_verify_similarity_and_calibration(small_checkpoint):
    emb = Embedder(small_checkpoint[0], batch_size=2, cache=False)
    a, b = photo("chelsea"), photo("chelsea")[:, ::-1]
    result = emb.verify(a, a)
    assert result.similarity == pytest.approx(1.0, abs=1e-5)
    assert result.threshold == embedding.DEFAULT_THRESHOLD and result.threshold_source == "default"
    assert result.verified and bool(result)
    va, vb = emb.embed([a, b])
    assert emb.similarity(a, b) == pytest.approx(float(va @ vb), abs=1e-6)
    assert emb.similarity(va, vb) == pytest.approx(float(va @ vb), abs=1e-6)
    strict = emb.verify(a, b, threshold=1.01)
    assert not strict.verified and strict.threshold_source == "given"
    scores = np.r_[np.linspace(0.6, 0.9, 20), np.linspace(0.1, 0.5, 20)]
    labels = np.r_[np.ones(20), np.zeros(20)]
    metrics = emb.calibrate(scores, labels)
    assert emb.threshold == pytest.approx(metrics.eer_threshold) and 0.5 <= emb.threshold <= 0.6
    assert emb.verify(va, vb).threshold_source == "calibrated"


def test_verify_at_a_target_far_and_refusals(small_embedder, small_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.random(2000) < 0.5
    scores = np.clip(rng.normal(0.3, 0.1, 2000) + 0.35 * labels, -1, 1)
    emb = Embedder(model=small_embedder.model, batch_size=2)
    calibration = emb.calibrate(scores, labels, target_far=1e-2, n_bootstrap=100)
    assert isinstance(calibration, embedding.Calibration) and emb.calibration is calibration
    assert emb.threshold == calibration.threshold and calibration.far <= 1e-2
    a, b = emb.embed([photo("chelsea"), photo("coffee")])
    result = emb.verify(a, b)
    assert result.threshold_source == "calibrated" and result.calibration is calibration
    assert result.verified == (result.similarity >= calibration.threshold)

    path = calibration.save(tmp_path / "cal.json")
    from_file = Embedder(model=small_embedder.model, calibration=path)
    assert from_file.verify(a, b).threshold == calibration.threshold
    from_dict = Embedder(model=small_embedder.model, calibration=calibration.to_dict())
    assert from_dict.verify(a, b).calibration == calibration
    other = embedding.Calibration(**{**calibration.__dict__, "model": "another/model"})
    with pytest.warns(UserWarning, match="made with model 'another/model'"):
        Embedder(small_checkpoint[0], cache=False, calibration=other)

    nan_vector = a.copy()
    nan_vector[3] = np.nan
    for call, kind, message in [
        (lambda: emb.verify(a, b, threshold=float("nan")), ValueError, "finite"),
        (lambda: emb.verify(a, b, threshold=float("inf")), ValueError, "finite"),
        (lambda: emb.verify(a, b, threshold="0.5"), TypeError, "number"),
        (lambda: emb.verify(nan_vector, b), ValueError, "NaN or infinity"),
        (lambda: Embedder(model=emb.model, threshold=float("nan")), ValueError, "finite"),
        (
            lambda: Embedder(model=emb.model, threshold=0.3, calibration=path),
            ValueError,
            "not both",
        ),
        (lambda: Embedder(model=emb.model, calibration=3), TypeError, "Calibration"),
        (lambda: emb.calibrate(scores, labels, n_bootstrap=5), TypeError, "only with target_far"),
    ]:
        with pytest.raises(kind, match=message):
            call()


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

PEOPLE = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


def _augment(image, k):
    if k == 1:
        return image
    if k == 2:
        return image[:, ::-1]
    h, w = image.shape[:2]
    crop = image[h // 12 : h - h // 10, w // 10 : w - w // 14].astype(np.float32)
    return np.clip(crop * 1.15 + 8, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def lfw_like(tmp_path_factory):
    """ROOT/name/name_000k.jpg for 4 'people' x 3 views, and a 2-fold pairs file."""
    root = tmp_path_factory.mktemp("lfw_like")
    for name, source in PEOPLE.items():
        (root / name).mkdir()
        for k in (1, 2, 3):
            image = _augment(photo(source), k)
            Image.fromarray(image).save(root / name / f"{name}_{k:04d}.jpg", quality=90)
    names = list(PEOPLE)
    fold = lambda i: [  # noqa: E731
        f"{names[i]} 1 2",
        f"{names[i + 1]} 1 3",
        f"{names[i]} 2 3",
        f"{names[i]} 1 {names[i + 1]} 1",
        f"{names[i]} 2 {names[i + 2]} 3",
        f"{names[i + 1]} 3 {names[i + 2]} 2",
    ]
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(["2 3", *fold(0), *fold(1)]) + "\n")
    return root, pairs


def test_cli_embed_verify_evaluate(small_checkpoint, lfw_like, tmp_path, capsys):
    folder = small_checkpoint[0]
    root, pairs = lfw_like
    common = ["--model", folder, "--batch-size", "4", "--cache-dir", str(tmp_path / "c")]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"broken")
    out = tmp_path / "vectors.npz"
    code = embedding_cli.main(
        ["embed", str(root), str(tmp_path / "in"), "-o", str(out), "--no-progress", *common]
    )
    captured = capsys.readouterr()
    assert code == 0 and "12 embeddings of dim 320, 1 skipped" in captured.out
    assert "broken.jpg" in captured.err
    with np.load(out, allow_pickle=False) as data:
        assert data["embeddings"].shape == (12, 320) and data["embeddings"].dtype == np.float32
        assert sorted(set(data["labels"].tolist())) == sorted(PEOPLE)
        assert data["skipped"].tolist()[0].endswith("broken.jpg")
        first = data["embeddings"][0]
    gallery = embedding.Gallery.load(out)
    labels, scores = gallery.search(first, k=1)
    assert labels == ["astronaut"] and scores[0] == pytest.approx(1.0, abs=1e-5)

    image = str(root / "cat" / "cat_0001.jpg")
    code = embedding_cli.main(["verify", image, image, *common, "--threshold", "0.9"])
    text = capsys.readouterr().out
    assert code == 0 and "similarity: 1.0000" in text and "SAME" in text
    code = embedding_cli.main(["verify", image, str(root / "rocket" / "rocket_0002.jpg"), *common])
    assert code == 0 and "uncalibrated" in capsys.readouterr().out

    report = tmp_path / "metrics.json"
    calibration = tmp_path / "cal.json"
    code = embedding_cli.main(
        ["evaluate", str(pairs), "--root", str(root), "--json", str(report), "--target-far", "0.5",
         "--bootstrap", "50", "--save-calibration", str(calibration), *common]
    )  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    for fragment in ("EER:", "ROC AUC:", "TAR@FAR=0.01", "TAR@FAR=0.0001", "2-fold accuracy"):
        assert fragment in text
    assert "operating point at FAR <= 0.5" in text and "threshold:" in text
    saved = embedding.Calibration.load(calibration)
    assert json.loads(report.read_text())["calibration"]["threshold"] == saved.threshold
    assert saved.n_genuine == 6 and saved.n_impostor == 6 and saved.far <= 0.5
    code = embedding_cli.main(["verify", image, image, *common, "--calibration", str(calibration)])
    text = capsys.readouterr().out
    assert code == 0 and "calibrated at FAR <= 0.5" in text and "SAME" in text
    assert f"threshold:  {saved.threshold:.6f}" in text
    calibration.write_text('{"kind": "keras-convnext-calibration", "format": 1, "threshold": NaN}')
    for extra, message in [
        (["--calibration", str(calibration)], "threshold must be finite"),
        (["--threshold", "nan"], "--threshold: must be a finite number"),
    ]:
        code = embedding_cli.main(["verify", image, image, *common, *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err


def test_cli_errors_are_clear(tmp_path, capsys):
    code = embedding_cli.main(["embed", str(tmp_path / "missing"), "-o", str(tmp_path / "x.npz")])
    assert code == 2 and "no such file" in capsys.readouterr().err
    bad_pairs = tmp_path / "pairs.txt"
    bad_pairs.write_text("1 1\nonly_two 1\n")
    code = embedding_cli.main(["evaluate", str(bad_pairs), "--root", str(tmp_path)])
    assert code == 2 and "pairs.txt:2" in capsys.readouterr().err


def test_read_pairs_lfw_format(tmp_path):
    path = tmp_path / "pairs.txt"
    lines = ["Abel_Pacheco 1 4", "Abdel_Madi_Shabneh 1 Dean_Barker 1"]
    path.write_text("\n".join(["2 1", *lines, *lines]) + "\n")
    pairs, labels, folds = embedding_cli.read_pairs(path, "/lfw")
    assert folds == 2 and labels == [1, 0, 1, 0]
    assert pairs[0] == (
        "/lfw/Abel_Pacheco/Abel_Pacheco_0001.jpg",
        "/lfw/Abel_Pacheco/Abel_Pacheco_0004.jpg",
    )
    assert pairs[1][1] == "/lfw/Dean_Barker/Dean_Barker_0001.jpg"


def test_help_does_not_import_keras():
    import subprocess
    import sys

    code = "import sys, embedding.cli as c; c.build_parser(); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------
# Preprocessing of every kind of published tag, and the test size
# ----------------------------------------------------------------------------

TAG_CFGS = [
    "convnext_large_mlp.clip_laion2b_augreg_ft_in1k_384",  # CLIP mean/std, squash, 384
    "convnext_base.clip_laion2b",  # CLIP, crop_pct 1.0, 256
    "convnext_base.fb_in22k_ft_in1k_384",  # ImageNet, squash
    "convnext_zepto_rms.ra4_e3600_r224_in1k",  # mean / std 0.5
    "convnext_nano.in12k_ft_in1k",  # crop_pct 0.95
]


@pytest.mark.parametrize("tag", TAG_CFGS)
@pytest.mark.parametrize("use_test_size", [False, True])
def test_preprocess_matches_timm_for_published_tags(tag, use_test_size):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag).to_dict()
    transform = create_transform(
        **resolve_data_config({}, pretrained_cfg=cfg, use_test_size=use_test_size)
    )
    preprocessor = Preprocessor(cfg, use_test_size=use_test_size)
    for name in ("astronaut", "coffee", "camera"):
        image = Image.fromarray(photo(name))
        expected = transform(image.convert("RGB")).numpy().transpose(1, 2, 0)
        got = preprocessor(image)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{tag} {name}")


def test_embedder_at_the_test_input_size(small_checkpoint):
    """use_test_size: timm's test-time resolution, through a model that takes any size."""
    folder, timm_model = small_checkpoint
    cfg = dict(timm_model.pretrained_cfg, input_size=(3, 64, 64), test_input_size=(3, 96, 96))
    cfg["test_crop_pct"] = 1.0
    embedder = Embedder(folder, pretrained_cfg=cfg, use_test_size=True, cache=False)
    assert embedder.preprocessor.config.input_size == (96, 96)
    image = photo("chelsea")
    transform = create_transform(**resolve_data_config({}, pretrained_cfg=cfg, use_test_size=True))
    x = transform(Image.fromarray(image)).numpy()[None].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(embedder.embed(image), timm_embedding(timm_model, x), atol=1e-5)


def test_compilation_cache_keeps_executables_for_the_next_process(tmp_path):
    """The command line's JAX compilation cache: the executable is written for the next
    process (the same call is a no-op on the other backends)."""
    import subprocess
    import sys

    import keras

    if keras.backend.backend() != "jax":
        assert model_module.enable_compilation_cache(tmp_path) is None
        return
    code = (
        "import sys, jax, jax.numpy as jnp; from embedding.model import enable_compilation_cache;"
        " print(enable_compilation_cache(sys.argv[1]));"
        " jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "KERAS_BACKEND": "jax"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    run = [sys.executable, "-c", code, str(tmp_path)]
    first = subprocess.run(run, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(tmp_path / "xla")
    assert os.listdir(tmp_path / "xla")  # the executable is on disk for the next process


def test_non_commercial_licence_is_called_out(timm_v2_atto_checkpoint, tmp_path, capsys):
    folder, _ = timm_v2_atto_checkpoint  # timm's convnextv2 pretrained_cfg: cc-by-nc-4.0
    Image.fromarray(photo("coffee")).save(tmp_path / "coffee.png")
    argv = ["embed", str(tmp_path / "coffee.png"), "-o", str(tmp_path / "v.npz")]
    assert embedding_cli.main([*argv, "--model", folder, "--no-cache", "--no-progress"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "cc-by-nc-4.0" in notes[0] and "not for commercial use" in notes[0]
