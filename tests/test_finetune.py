"""ArcFace fine-tuning: digits (10 "identities") below 5% held-out EER, the
command line on an image folder, resume after an interruption, data splits,
and a two-device (simulated on the CPU) data-parallel run matching one device."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import BACKEND
from PIL import Image

import embedding.finetune as ft
from convnext_v2 import create_convnext_v2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits(size):
    """scikit-learn's 8x8 digits (offline), upscaled to size x size RGB in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.stack(
        [
            np.asarray(Image.fromarray(img / 16.0).resize((size, size), Image.BILINEAR))
            for img in d.images.astype("float32")
        ]
    )
    x = np.repeat(((x - 0.5) / 0.5)[..., None], 3, axis=-1).astype("float32")
    return x, d.target


def tiny_model(size=16, dim=16, name="tiny"):
    image = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="gelu")(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim)(x)
    return keras.Model(image, x, name=name)


def test_split_holdout():
    ids = np.repeat(np.array(list("abcdefghij")), 7)
    train, held = ft.split_holdout(ids, 0.3, "identity", seed=1)
    assert set(ids[train]).isdisjoint(ids[held]) and len(set(ids[held])) == 3
    assert sorted(np.concatenate([train, held])) == list(range(len(ids)))
    train, held = ft.split_holdout(ids, 0.3, "image", seed=1)
    assert set(ids[train]) == set(ids[held]) == set(ids)
    assert all((ids[held] == c).sum() == 2 for c in set(ids))
    again = ft.split_holdout(ids, 0.3, "image", seed=1)
    assert (again[1] == held).all()
    i, j, same = ft.verification_pairs(ids[held])
    assert len(i) == len(held) * (len(held) - 1) // 2 and same.sum() == 10
    i, j, same = ft.verification_pairs(ids, max_pairs=100, seed=0)
    assert len(i) == 100 and same.sum() == 50 and (i != j).all()


def test_atomic_save_and_sidecar(tmp_path):
    model = ft.as_embedding_model(tiny_model())
    model.pretrained_cfg = {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3}
    path = str(tmp_path / "m.keras")
    ft.save_model(model, path, {"epoch": 3})
    assert sorted(os.listdir(tmp_path)) == ["m.config.json", "m.keras"]  # no temp files left
    loaded = ft.load_model(path)
    assert loaded.pretrained_cfg["mean"] == [0.5] * 3
    with open(tmp_path / "m.config.json") as f:
        assert json.load(f)["epoch"] == 3
    x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert np.allclose(np.linalg.norm(loaded.predict(x, verbose=0), axis=1), 1.0, atol=1e-5)


def test_resume_after_interruption(tmp_path, monkeypatch):
    """Interrupted after epoch 1 of 3: the rerun continues at epoch 2 with the
    optimizer state, and ends like an uninterrupted run."""
    x, y = digits(16)
    data = (x[:240], y[:240])
    kwargs = dict(epochs=3, batch_size=32, holdout=0.25, holdout_by="image", verbose=0, seed=0)
    out = str(tmp_path / "tuned.keras")

    original = ft.TrainBatches.set_epoch

    def interrupt(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch)

    keras.utils.set_random_seed(0)
    first = tiny_model()
    monkeypatch.setattr(ft.TrainBatches, "set_epoch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(data, first, output=out, **kwargs)
    monkeypatch.setattr(ft.TrainBatches, "set_epoch", original)
    with open(out + ".ckpt/state.json") as f:
        state = json.load(f)
    assert state["epoch"] == 1 and len(state["history"]) == 1

    # a different setting refuses the checkpoint, naming it
    keras.utils.set_random_seed(0)
    with pytest.raises(ValueError, match="different run.*epochs: was 3, now 4"):
        ft.finetune(data, tiny_model(), output=out, **{**kwargs, "epochs": 4})

    keras.utils.set_random_seed(0)  # the same input model: its weights are part of the run
    resumed = ft.finetune(data, tiny_model(), output=out, **kwargs)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert not os.path.exists(out + ".ckpt")  # removed once done

    keras.utils.set_random_seed(0)
    straight = ft.finetune(data, tiny_model(), output=str(tmp_path / "b.keras"), **kwargs)
    np.testing.assert_allclose(
        [h["loss"] for h in resumed.history], [h["loss"] for h in straight.history], rtol=1e-4
    )
    assert abs(resumed.metrics_after.eer - straight.metrics_after.eer) < 1e-6


@pytest.mark.slow
def test_digits_convnext_v2_atto_below_5_percent_eer(tmp_path):
    """V2 atto from random init, 32x32 digits, each digit an identity, 30% of every
    digit's images held out: held-out pair EER goes from ~20% to below 5%."""
    x, y = digits(32)
    keras.utils.set_random_seed(0)
    model = create_convnext_v2("atto", include_top=False, pooling="avg", input_shape=(32, 32, 3))
    out = str(tmp_path / "digits.keras")
    result = ft.finetune(
        (x, y),
        model,
        output=out,
        epochs=3,
        batch_size=32,
        learning_rate=2e-3,
        holdout=0.3,
        holdout_by="image",
        augment=False,
        seed=0,
        verbose=2,
    )
    before, after = result.metrics_before.eer, result.metrics_after.eer
    print(f"[{BACKEND}] digits held-out EER before {before:.4f} after {after:.4f}")
    assert before > 0.1
    assert after < 0.05
    assert result.best_epoch >= 1
    loaded = ft.load_model(out)
    emb = loaded.predict(x[:8], verbose=0)
    np.testing.assert_allclose(emb, result.model.predict(x[:8], verbose=0), atol=1e-5)


def write_digit_folder(root, per_class=12, size=32):
    x, y = digits(size)
    for digit in range(10):
        folder = os.path.join(root, f"person_{digit}")
        os.makedirs(folder)
        for k, idx in enumerate(np.flatnonzero(y == digit)[:per_class]):
            rgb = ((x[idx] + 1) * 127.5).clip(0, 255).astype("uint8")
            Image.fromarray(rgb).save(os.path.join(folder, f"{k}.png"))
    return root


@pytest.mark.slow
def test_command_line_on_image_folder(tmp_path, timm_v2_atto_checkpoint, capsys):
    """`python -m embedding finetune DIR --model SOURCE -o tuned.keras` on a folder
    of PNGs, from a random-timm checkpoint folder (no network)."""
    from embedding.cli import main

    folder, _ = timm_v2_atto_checkpoint
    data = write_digit_folder(str(tmp_path / "data"))
    out = str(tmp_path / "tuned.keras")
    argv = ["finetune", data, "--model", str(folder), "--image-size", "32", "--epochs", "1"]
    argv += ["--batch-size", "16", "--holdout", "0.3", "--no-cache", "--no-progress", "-o", out]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out before" in printed and "EER" in printed and f"wrote {out}" in printed
    model = ft.load_model(out)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.pretrained_cfg["input_size"] == [3, 32, 32]
    emb = model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0)
    assert emb.shape == (2, 320) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert not os.path.exists(out + ".ckpt")


TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, keras, numpy as np
    import embedding.finetune as ft
    from embedding.arcface import ArcFace

    assert len(jax.devices()) == 2, jax.devices()

    def tiny():
        image = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="gelu")(image)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(image, keras.layers.Dense(16)(x))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    y = np.repeat(np.arange(8), 8)
    out = {}

    keras.utils.set_random_seed(0)
    init = ft.build_training_model(ft.as_embedding_model(tiny()), 8).get_weights()

    def step(distribution):
        scope = distribution.scope() if distribution else __import__("contextlib").nullcontext()
        with scope:
            emb_model = ft.as_embedding_model(tiny())
            train = ft.build_training_model(emb_model, 8)
            train.set_weights(init)
            train.compile(keras.optimizers.AdamW(1e-2),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            loss = train.train_on_batch([x[:32], y[:32]], y[:32])
            loss = train.evaluate([x, y], y, batch_size=32, verbose=0)
            images = ft.ImageSet.from_arrays(x, y)
            emb = ft.embed_images(emb_model, images, np.arange(50), batch_size=16)
            weights = [np.asarray(w) for w in train.get_weights()]
        return float(loss), emb, weights

    dp = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    one, two = step(None), step(dp)
    assert ft.resolve_distribution("auto") is not None
    out["loss"] = [one[0], two[0]]
    out["emb"] = float(np.abs(one[1] - two[1]).max())
    out["weights"] = max(float(np.abs(a - b).max()) for a, b in zip(one[2], two[2]))
    out["emb_shape"] = list(two[1].shape)

    # the fine-tuning entry point on 2 devices ("auto") vs 1 device
    data = (x, y)
    kw = dict(epochs=2, batch_size=16, holdout=0.25, holdout_by="image", augment=False, verbose=0)
    keras.utils.set_random_seed(0)
    a = ft.finetune(data, tiny(), distribution=None, **kw)
    keras.utils.set_random_seed(0)
    b = ft.finetune(data, tiny(), distribution="auto", **kw)
    out["ft_loss"] = [[h["loss"] for h in a.history], [h["loss"] for h in b.history]]
    out["ft_eer"] = [a.metrics_after.eer, b.metrics_after.eer]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution.DataParallel needs JAX")
def test_two_devices_match_one():
    env = dict(
        os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    np.testing.assert_allclose(out["loss"][0], out["loss"][1], rtol=1e-5)
    assert out["emb"] < 1e-5 and out["weights"] < 1e-5 and out["emb_shape"] == [50, 16]
    np.testing.assert_allclose(out["ft_loss"][0], out["ft_loss"][1], rtol=1e-4)
    assert abs(out["ft_eer"][0] - out["ft_eer"][1]) < 1e-3
