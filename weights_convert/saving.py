"""Saving converted models and reading them back.

A `ConvNeXt` saved as `.keras` holds everything it is (architecture, head, timm's
pretrained_cfg, metadata) in the file's own config, so `keras.saving.load_model`
alone gives it back. A `.weights.h5` file holds weights only; its architecture
goes to `OUT.config.json` beside it (what Keras' own weights files need too).
Files written before models carried their config (`OUT.keras` + `OUT.config.json`)
still load, with the sidecar's architecture and pretrained_cfg attached.
"""

from __future__ import annotations

import json
import os
import zipfile

import keras

from convnext_common.files import atomic_path, atomic_write_text, check_output_path
from convnext_common.jsonable import jsonable
from convnext_layers import ConvNeXt, load_saved_model
from weights_convert.convert import annotate_model
from weights_convert.errors import SavedModelError

OUTPUT_SUFFIXES = (".keras", ".weights.h5")
SIDECAR_FORMAT = 2


def sidecar_path(output) -> str:
    """'model.keras' / 'model.weights.h5' -> 'model.config.json'."""
    output = os.fspath(output)
    for suffix in OUTPUT_SUFFIXES:
        if output.endswith(suffix):
            return output[: -len(suffix)] + ".config.json"
    return output + ".config.json"


def save_converted(
    model: keras.Model, output, metadata: dict | None = None, *, extra: dict | None = None
) -> str:
    """Save to OUT.keras or OUT.weights.h5 atomically; returns the path.

    A `ConvNeXt` `.keras` file describes itself (`metadata` entries, or `extra`,
    are merged into the model's `metadata` first). A `.weights.h5` file gets
    `OUT.config.json` with the model's config. Any other Keras model (e.g. your
    own backbone fine-tuned by `embedding.finetune`) is saved with a sidecar
    `OUT.config.json` holding its `timm_architecture`, `pretrained_cfg` and the
    metadata, which `load_converted` attaches again.
    """
    output = check_output_path(output, option="output", suffixes=OUTPUT_SUFFIXES)
    metadata = {**(metadata or {}), **(extra or {})}
    if not isinstance(model, ConvNeXt):
        with atomic_path(output) as tmp:
            model.save(tmp) if output.endswith(".keras") else model.save_weights(tmp)
        description = {
            "architecture": getattr(model, "timm_architecture", None),
            "pretrained_cfg": jsonable(getattr(model, "pretrained_cfg", None) or {}),
            **jsonable(metadata),
        }
        atomic_write_text(sidecar_path(output), json.dumps(description, indent=1))
        return output
    if metadata:
        model.metadata.update(jsonable(metadata))
    if output.endswith(".keras"):
        with atomic_path(output) as tmp:
            model.save(tmp)
        return output
    with atomic_path(output) as tmp:
        model.save_weights(tmp)
    description = {"format": SIDECAR_FORMAT, "class": "ConvNeXt", "config": model.get_config()}
    atomic_write_text(sidecar_path(output), json.dumps(description, indent=1))
    return output


def _read_sidecar(path):
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SavedModelError(f"Cannot read {path}: {error}") from None
    if not isinstance(meta, dict):
        raise SavedModelError(f"{path} must hold a JSON object.")
    return meta


def _check_keras_file(path):
    if not os.path.isfile(path):
        raise SavedModelError(f"{path!r} does not exist or is not a file.")
    if not zipfile.is_zipfile(path):
        raise SavedModelError(
            f"{path!r} is not a .keras model file (not a zip archive: truncated, or another "
            "format)."
        )
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    if "config.json" not in names:
        raise SavedModelError(f"{path!r} is not a .keras model file (no config.json inside).")


def load_converted(path) -> keras.Model:
    """A model saved by `save_converted`, `finetune` or `model.save` of a `ConvNeXt`.

    `.keras`: read with `keras.saving.load_model` (safe mode: nothing is
    unpickled), skipping the random initialisation its weights replace; a file
    from before models carried their config gets its sidecar's architecture and
    pretrained_cfg attached. `.weights.h5`: rebuilt from `OUT.config.json`.
    Raises `SavedModelError` for anything that is not such a file.
    """
    path = os.fspath(path)
    if path.endswith(".weights.h5"):
        return _load_weights_file(path)
    if not path.endswith(".keras"):
        raise SavedModelError(
            f"{path!r}: a saved model is a .keras file (or .weights.h5 with its .config.json)."
        )
    _check_keras_file(path)
    try:
        model = load_saved_model(path, compile=False)
    except Exception as error:  # keras raises many kinds for damaged or foreign files
        raise SavedModelError(
            f"Cannot load {path!r} as a model: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from None
    if not isinstance(model, ConvNeXt):
        sidecar = sidecar_path(path)
        meta = _read_sidecar(sidecar) if os.path.exists(sidecar) else {}
        annotate_model(model, meta.pop("architecture", None), meta.pop("pretrained_cfg", None))
        meta.pop("num_classes", None)
        object.__setattr__(model, "metadata", meta)
    return model


def _load_weights_file(path):
    sidecar = sidecar_path(path)
    if not os.path.exists(sidecar):
        raise SavedModelError(
            f"{path!r} holds weights only; its architecture file {sidecar!r} is missing."
        )
    meta = _read_sidecar(sidecar)
    if meta.get("class") != "ConvNeXt" or not isinstance(meta.get("config"), dict):
        raise SavedModelError(f"{sidecar!r} does not describe a ConvNeXt model.")
    try:
        model = ConvNeXt.from_config(meta["config"])
        model.load_weights(path)
    except Exception as error:
        raise SavedModelError(f"Cannot load {path!r}: {type(error).__name__}: {error}") from None
    return model
