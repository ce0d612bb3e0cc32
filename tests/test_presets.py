"""Presets in keras-hub's layout (convnext_layers.presets, weights_convert.presets):
written by `save_to_preset`, read back by `from_preset` from a folder, from a Hub
cache laid out as the Hub's (offline), from a timm repository; tampered presets
refused; `python -m weights_convert SOURCE --preset DIR [--upload hf://...]` with
the upload intercepted. Nothing is downloaded or uploaded."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import torch
from conftest import fill_hub_cache, nchw_to_nhwc

import weights_convert as wc
import weights_convert.presets  # noqa: F401  (registers the timm reader and parity here)
from convnext_layers import ConvNeXt, PresetError, upload_preset
from convnext_layers import presets as presets_module
from convnext_layers.loading import FAST_LOAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def face_preset(timm_face_checkpoint, tmp_path_factory):
    """(preset folder, the model it was written from)."""
    model = wc.load_timm(timm_face_checkpoint[0], verbose=False)
    folder = str(tmp_path_factory.mktemp("presets") / "face")
    assert model.save_to_preset(folder) == folder
    return folder, model


def _copy(preset, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(preset, target)
    return target


def _images(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 112, 112, 3), dtype=np.float32)


def test_preset_layout_metadata_and_model_card(face_preset):
    folder, model = face_preset
    assert sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
        "metadata.json",
        "model.weights.h5",
    ]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["registered_name"] == "convnext>ConvNeXt" and config["class_name"] == "ConvNeXt"
    assert config["config"]["config"]["patch_size"] == 2
    with open(os.path.join(folder, "metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["parameter_count"] == model.count_params()
    assert metadata["keras_version"] == keras.version()
    assert metadata["timm_architecture"] == "convnext_atto"
    assert metadata["timm_model_args"]["patch_size"] == 2
    assert metadata["license"] == "apache-2.0"
    assert metadata["pretrained_cfg"]["input_size"] == [3, 112, 112]
    parity = metadata["parity"]
    assert parity["input_shape"] == [2, 112, 112, 3] and parity["output"] == "logits"
    assert 0 <= parity["max_abs_diff"] < 1e-4
    with open(os.path.join(folder, "README.md")) as f:
        card = f.read()
    assert card.startswith("---\nlibrary_name: keras\nlicense: apache-2.0\n")
    assert "| Licence | apache-2.0" in card and "112x112 RGB" in card
    assert f"max |Keras - timm| = {parity['max_abs_diff']:.2g}" in card


def test_parity_figure_is_timms_not_the_models_own(face_preset, monkeypatch):
    """The figure compares with timm's network: a model whose weights drifted from
    timm's layout (one weight changed after export) shows the difference."""
    _, model = face_preset
    honest = weights_convert.presets.timm_parity(model)["max_abs_diff"]
    original = weights_convert.presets._timm_output

    def shifted(model, reference, x):
        out, what = original(model, reference, x)
        return out + 0.5, what

    monkeypatch.setattr(weights_convert.presets, "_timm_output", shifted)
    assert weights_convert.presets.timm_parity(model)["max_abs_diff"] == pytest.approx(
        0.5, abs=1e-3
    )
    assert honest < 1e-4


@pytest.mark.once("tensorflow")  # reading the files is Keras', not the backend's
def test_preset_reloads_alone_in_a_fresh_process(face_preset, tmp_path):
    folder, model = face_preset
    x = _images(1)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict_on_batch(x))
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from convnext_layers import ConvNeXt
        model = ConvNeXt.from_preset({folder!r})
        assert "weights_convert" not in sys.modules and "timm" not in sys.modules
        x, y = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "y.npy")!r})
        difference = float(np.abs(model.predict_on_batch(x) - y).max())
        print("DIFF", difference, model.pretrained_cfg["input_size"])
        """
    )
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("DIFF")][0]
    assert float(line.split()[1]) <= 1e-6
    assert "[3, 112, 112]" in line


def _altered_weights(preset, tmp_path):
    """The preset with the weights of a wider network of the same layers."""
    config = wc.ARCHITECTURES["convnext_femto"].replace(patch_size=2)
    with FAST_LOAD.enabled():  # zeros, not random: only the shapes matter here
        other = ConvNeXt.from_config({"config": config.to_dict(), "num_classes": 512})
    other_folder = str(tmp_path / "femto")
    other.save_to_preset(other_folder, parity=None)
    target = _copy(preset, tmp_path)
    shutil.copy(os.path.join(other_folder, "model.weights.h5"), target / "model.weights.h5")
    return target


def _without_hashes(target):
    path = target / "metadata.json"
    with open(path) as f:
        metadata = json.load(f)
    metadata.pop("files")
    path.write_text(json.dumps(metadata))
    return target


TAMPERED = {
    "weights_of_another_model": (_altered_weights, "model.weights.h5 does not match the sha256"),
    "weights_of_another_shape_no_hashes": (
        lambda p, t: _without_hashes(_altered_weights(p, t)),
        "does not fit the model",
    ),
    "missing_weights": (
        lambda p, t: (_copy(p, t) / "model.weights.h5").unlink() or t / "copy",
        "has no model.weights.h5",
    ),
    "missing_metadata": (
        lambda p, t: (_copy(p, t) / "metadata.json").unlink() or t / "copy",
        "has no metadata.json",
    ),
    "config_of_another_class": (
        lambda p, t: _edit_config(p, t, registered_name="keras_hub>ResNetBackbone"),
        "describes 'keras_hub>ResNetBackbone', not a ConvNeXt",
    ),
    "config_edited": (
        lambda p, t: _edit_config(p, t, name="edited"),
        "config.json does not match the sha256",
    ),
    "not_json": (
        lambda p, t: (_copy(p, t) / "config.json").write_text("{") and t / "copy",
        "Cannot read the preset's config.json",
    ),
}


def _edit_config(preset, tmp_path, **changes):
    target = _copy(preset, tmp_path)
    with open(target / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_presets_are_refused(case, face_preset, tmp_path):
    make, message = TAMPERED[case]
    target = make(face_preset[0], tmp_path)
    with pytest.raises(PresetError, match=message.replace("|", r"\|")):
        ConvNeXt.from_preset(str(target))


@pytest.mark.once("torch")  # argument checks: no model is built
def test_preset_sources_and_targets_are_checked(tmp_path, face_preset):
    with pytest.raises(PresetError, match="no such folder"):
        ConvNeXt.from_preset(str(tmp_path / "nowhere"))
    with pytest.raises(PresetError, match="not a Hub preset name"):
        ConvNeXt.from_preset("hf://just-a-name")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PresetError, match="holds other files"):
        face_preset[1].save_to_preset(str(tmp_path / "busy"), parity=None)
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


def test_from_preset_through_an_offline_hub_cache(face_preset, offline_hub):
    folder, model = face_preset
    fill_hub_cache(offline_hub, "someone/convnext-face", folder)
    loaded = ConvNeXt.from_preset("hf://someone/convnext-face")
    x = _images(2)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    with pytest.raises(PresetError, match="HF_HUB_OFFLINE"):
        ConvNeXt.from_preset("hf://someone/not-cached")


def test_from_preset_reads_a_timm_repository(timm_atto_checkpoint, offline_hub):
    folder, timm_model = timm_atto_checkpoint
    fill_hub_cache(offline_hub, "timm/convnext_atto.d2_in1k", folder)
    model = ConvNeXt.from_preset("hf://timm/convnext_atto.d2_in1k")
    assert model.timm_architecture == "convnext_atto"
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.predict_on_batch(nchw_to_nhwc(x)), expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.once("jax")  # package discovery: one backend suffices
def test_the_entry_point_finds_the_timm_reader_without_importing_weights_convert(
    timm_atto_checkpoint, tmp_path
):
    """As installed (an entry point, what pyproject.toml declares) `from_preset` reads a
    timm repository in a process that never imported weights_convert itself."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["entry-points"]
    readers = declared[presets_module.READER_GROUP]
    assert readers == {"timm": "weights_convert.presets:read_timm_preset"}
    assert declared[presets_module.PARITY_GROUP] == {"timm": "weights_convert.presets:timm_parity"}
    site = tmp_path / "site"  # the installed metadata of an editable install, as pip writes it
    info = site / "keras_convnext_test_plugins-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: keras-convnext-test-plugins\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{presets_module.READER_GROUP}]\n"
        + "".join(f"{name} = {target}\n" for name, target in readers.items())
    )
    script = textwrap.dedent(
        f"""
        import sys
        from convnext_layers import ConvNeXt
        assert "weights_convert" not in sys.modules
        model = ConvNeXt.from_preset({str(timm_atto_checkpoint[0])!r})
        print("ARCH", model.timm_architecture, "weights_convert" in sys.modules)
        """
    )
    env = dict(
        os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONPATH=f"{ROOT}{os.pathsep}{site}"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ARCH convnext_atto True" in proc.stdout


def test_timm_repository_without_the_converter_is_explained(timm_atto_checkpoint, monkeypatch):
    monkeypatch.setattr(presets_module, "_READERS", {})
    monkeypatch.setattr(presets_module.importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(PresetError, match="timm checkpoint .* keras-convnext\\[convert\\]"):
        ConvNeXt.from_preset(str(timm_atto_checkpoint[0]))


@pytest.fixture
def hub_calls(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create", a, k))
    )
    monkeypatch.setattr(
        huggingface_hub, "upload_folder", lambda *a, **k: calls.append(("upload", a, k))
    )
    return calls


@pytest.mark.once("torch")  # files and the intercepted call
def test_upload_checks_the_preset_then_calls_upload_folder(face_preset, tmp_path, hub_calls):
    folder, _ = face_preset
    assert upload_preset("hf://me/convnext-face", folder) == "me/convnext-face"
    assert [c[0] for c in hub_calls] == ["create", "upload"]
    assert hub_calls[1][2]["repo_id"] == "me/convnext-face"
    assert hub_calls[1][2]["folder_path"] == folder
    hub_calls.clear()
    with pytest.raises(PresetError, match="hf://owner/repo"):
        upload_preset("me/convnext-face", folder)
    with pytest.raises(PresetError, match="does not match the sha256"):
        upload_preset("hf://me/convnext-face", _edit_config(folder, tmp_path, name="x"))
    assert hub_calls == []


def test_command_line_writes_and_uploads_a_preset(
    timm_face_checkpoint, tmp_path, hub_calls, capsys
):
    folder, _ = timm_face_checkpoint
    preset = tmp_path / "preset"
    argv = [folder, "--preset", str(preset), "--upload", "hf://me/face", "-q"]
    assert wc.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("convnext_atto: preset written in ") and "max |Keras - timm|" in out[0]
    assert out[1] == f"uploaded {preset} -> https://huggingface.co/me/face"
    assert [c[0] for c in hub_calls] == ["create", "upload"]
    assert hub_calls[1][2]["folder_path"] == str(preset)
    with open(preset / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["timm_model_args"]["patch_size"] == 2  # what from_preset reads back
    assert metadata["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--upload", "hf://me/face"], "--upload pushes the preset: it needs --preset DIR"),
        ([], "required: -o/--output (or --preset DIR)"),
        (["--preset", "{busy}"], "holds other files"),
        (["--preset", "{new}", "--upload", "me/face"], "hf://owner/repo"),
        (["--preset", "{new}", "--dynamic-size"], "need -o OUT"),
    ],
)
def test_command_line_preset_errors_are_one_line_before_any_work(
    extra, message, tmp_path, timm_atto_checkpoint, monkeypatch, capsys
):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("")
    extra = [e.format(busy=tmp_path / "busy", new=tmp_path / "new") for e in extra]
    monkeypatch.setattr(wc.convert, "load_timm", lambda *a, **k: pytest.fail("converted first"))
    try:
        code = wc.main([timm_atto_checkpoint[0], *extra, "-q"])
    except SystemExit as usage:  # argparse's usage errors
        code = usage.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "new").exists()
