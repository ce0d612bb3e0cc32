"""ArcFace layer: NumPy reference of the margin formula, |cos| = 1 safety, mixed
precision, serialization and training with model.fit."""

import math

import keras
import numpy as np
import pytest

from embedding.arcface import ArcFace


def reference_logits(emb, centers, labels, s, m, easy_margin):
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centers / np.linalg.norm(centers, axis=0, keepdims=True)
    cos = np.clip(x @ w, -1.0, 1.0).astype(np.float64)
    theta = np.arccos(cos)
    phi = np.cos(theta + m)
    if easy_margin:
        phi = np.where(cos > 0, phi, cos)
    else:
        phi = np.where(theta + m <= math.pi, phi, cos - m * math.sin(m))
    onehot = np.eye(w.shape[1])[labels]
    return s * np.where(onehot > 0, phi, cos)


def make_layer(centers, **kwargs):
    layer = ArcFace(centers.shape[1], **kwargs)
    layer.build((None, centers.shape[0]))
    layer.centers.assign(centers)
    return layer


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("s,m", [(30.0, 0.35), (64.0, 0.5)])
def test_matches_numpy_reference(easy_margin, s, m):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(64, 16)).astype("float32")
    centers = rng.normal(size=(16, 7)).astype("float32")
    # push some samples next to / opposite their centre: theta + m > pi branch
    labels = rng.integers(0, 7, size=64)
    emb[:8] = -centers[:, labels[:8]].T + 0.05 * rng.normal(size=(8, 16))
    emb[8:16] = centers[:, labels[8:16]].T + 0.05 * rng.normal(size=(8, 16))
    layer = make_layer(centers, scale=s, margin=m, easy_margin=easy_margin)
    got = keras.ops.convert_to_numpy(layer([emb, labels]))
    want = reference_logits(emb, centers, labels, s, m, easy_margin)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-4 * s, rtol=1e-4)
    # the fallback branch (theta + m > pi, and cos <= 0 for easy_margin) was exercised
    theta = np.arccos(np.clip(_cos(emb, centers)[np.arange(64), labels], -1, 1))
    assert (theta + m > math.pi).any() and (theta + m < math.pi / 2).any()
    # without labels: plain scaled cosine
    plain = keras.ops.convert_to_numpy(layer(emb))
    np.testing.assert_allclose(plain, s * _cos(emb, centers), atol=1e-4 * s)


def _cos(emb, centers):
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = centers / np.linalg.norm(centers, axis=0, keepdims=True)
    return x @ w


def _loss_and_grads(layer, emb, labels):
    """Cross-entropy of the ArcFace logits and its gradients wrt embeddings and centres."""
    backend = keras.backend.backend()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if backend == "jax":
        import jax

        def f(e, c):
            logits, _ = layer.stateless_call([c], [], [e, labels])
            return loss_fn(labels, logits)

        loss, (ge, gc) = jax.value_and_grad(f, argnums=(0, 1))(emb, layer.centers.value)
        return np.asarray(loss), np.asarray(ge), np.asarray(gc)
    if backend == "tensorflow":
        import tensorflow as tf

        e = tf.Variable(emb)
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, layer([e, labels]))
        ge, gc = tape.gradient(loss, [e, layer.centers.value])
        return loss.numpy(), ge.numpy(), gc.numpy()
    import torch

    e = torch.tensor(emb, requires_grad=True)
    loss = loss_fn(torch.tensor(labels), layer([e, torch.tensor(labels)]))
    loss.backward()
    return (
        loss.detach().cpu().numpy(),
        e.grad.cpu().numpy(),
        layer.centers.value.grad.cpu().numpy(),
    )


@pytest.mark.parametrize("easy_margin", [False, True])
def test_finite_at_cos_plus_minus_one(easy_margin):
    # embeddings exactly on (cos = 1) and exactly opposite (cos = -1) their centre
    centers = np.eye(4, 3, dtype="float32")  # centre j = e_j (4-d)
    labels = np.array([0, 1, 2, 0, 1, 2], dtype="int32")
    emb = np.concatenate([centers.T, -centers.T]).astype("float32")
    layer = make_layer(centers, easy_margin=easy_margin)
    logits = keras.ops.convert_to_numpy(layer([emb, labels]))
    assert np.isfinite(logits).all()
    want = reference_logits(emb, centers, labels, 30.0, 0.35, easy_margin)
    np.testing.assert_allclose(
        logits, want, atol=5e-3
    )  # s * sqrt(1e-7) * sin(m): the sin floor at |cos| = 1
    loss, ge, gc = _loss_and_grads(layer, emb, labels)
    assert np.isfinite(loss) and np.isfinite(ge).all() and np.isfinite(gc).all()


def test_mixed_precision_computes_in_float32():
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = ArcFace(5)
        assert layer.dtype_policy.name == "float32"
        emb = keras.ops.cast(np.random.default_rng(1).normal(size=(4, 8)), "float16")
        out = layer([emb, np.array([0, 1, 2, 3])])
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        assert layer.centers.dtype == "float32"
        assert np.isfinite(keras.ops.convert_to_numpy(out)).all()
    finally:
        keras.config.set_dtype_policy(policy)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ArcFace(0)
    with pytest.raises(ValueError):
        ArcFace(3, margin=2.0)
    with pytest.raises(ValueError):
        ArcFace(3, scale=0)


def _toy_model(num_classes=3, dim=8):
    image = keras.Input((4,), name="x")
    label = keras.Input((), dtype="int32", name="label")
    emb = keras.layers.Dense(dim, name="embed")(image)
    logits = ArcFace(num_classes, scale=16.0, margin=0.3, name="arcface")([emb, label])
    return keras.Model([image, label], logits)


def test_fit_and_keras_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 4)) * 3
    y = rng.integers(0, 3, size=96).astype("int32")
    x = (means[y] + rng.normal(size=(96, 4))).astype("float32")
    model = _toy_model()
    model.compile(
        keras.optimizers.Adam(0.05),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit([x, y], y, batch_size=32, epochs=8, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    path = str(tmp_path / "arc.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects: registered
    layer = loaded.get_layer("arcface")
    assert isinstance(layer, ArcFace)
    assert (layer.num_classes, layer.scale, layer.margin, layer.easy_margin) == (
        3,
        16.0,
        0.3,
        False,
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded.predict([x, y], verbose=0)),
        keras.ops.convert_to_numpy(model.predict([x, y], verbose=0)),
        atol=1e-5,
    )
    # the embedding alone separates the classes
    embed = keras.Model(loaded.inputs[0], loaded.get_layer("embed").output)
    e = embed.predict(x, verbose=0)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    centers = keras.ops.convert_to_numpy(layer.centers)
    pred = np.argmax(e @ centers, axis=1)
    assert (pred == y).mean() > 0.9
