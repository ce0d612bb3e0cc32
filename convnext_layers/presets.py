"""keras-hub's preset layout for `ConvNeXt` models: `save_preset`, `load_preset`,
`upload_preset` (what `ConvNeXt.save_to_preset` / `ConvNeXt.from_preset` run).

A preset is a folder (or a Hugging Face Hub repository holding one) laid out as
keras-hub lays out its own, so a keras-hub user recognises it:

    config.json       keras.saving.serialize_keras_object(model): class_name,
                      registered_name ("convnext>ConvNeXt") and the model's config
    model.weights.h5  model.save_weights
    metadata.json     versions, parameter count, date, timm architecture and
                      arguments, pretrained_cfg, licence, the parity with timm
                      measured when it was written, and each file's sha256
    README.md         the model card

`load_preset(cls, "hf://owner/repo")` reads it through huggingface_hub (its cache,
HF_HUB_OFFLINE and HF_HUB_CACHE as usual). A timm repository ("hf://timm/<tag>":
config.json with "architecture", model.safetensors) is read by a preset reader
that another package registers: `weights_convert` does, through the
"keras_convnext.preset_readers" entry point (found without importing it) or on its
import. The parity figure comes the same way ("keras_convnext.parity"), so this
module imports neither timm nor `weights_convert`.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile

import huggingface_hub
import keras
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from convnext_common.jsonable import jsonable
from convnext_layers.errors import PresetError
from convnext_layers.hub import hub_cache_dir, hub_download, hub_offline, hub_reachable
from convnext_layers.loading import FAST_LOAD
from convnext_layers.model_card import model_card

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.weights.h5"
METADATA_FILE = "metadata.json"
README_FILE = "README.md"
PRESET_FILES = (CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE, README_FILE)
REGISTERED_NAME = "convnext>ConvNeXt"
READER_GROUP = "keras_convnext.preset_readers"
PARITY_GROUP = "keras_convnext.parity"
_HUB_URI = re.compile(r"^hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")

# registered in this process (name -> callable), besides the entry points
_READERS: dict = {}
_PARITY: dict = {}


def register_preset_reader(name: str, reader) -> None:
    """`reader(source, config) -> model or None`: reads a preset of another layout (the
    `config.json` it got is not keras-hub's), or None when it is not its kind."""
    _READERS[name] = reader


def register_parity(name: str, measure) -> None:
    """`measure(model) -> dict`: the parity of `model` with its reference implementation
    ({"max_abs_diff": float | None, "summary": str, ...}), or None when it cannot tell."""
    _PARITY[name] = measure


def _extensions(group: str, registered: dict) -> list:
    """The callables of an entry point group (installed packages), then those registered
    in this process; an entry point that fails to load is skipped."""
    found = dict(registered)
    for entry in importlib.metadata.entry_points(group=group):
        if entry.name in found:
            continue
        try:
            found[entry.name] = entry.load()
        except Exception:  # a broken optional extension must not break loading
            continue
    return list(found.values())


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_version() -> str:
    try:
        return importlib.metadata.version("keras-convnext")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def measure_parity(model) -> dict | None:
    """The first answer of the registered parity measures (e.g. weights_convert's, against
    timm), or None when none is available or none can tell."""
    for measure in _extensions(PARITY_GROUP, _PARITY):
        result = measure(model)
        if result is not None:
            return jsonable(result)
    return None


def _metadata(model, parity) -> dict:
    config = model.convnext_config
    try:
        timm_args = config.to_timm_args()
    except ValueError:
        timm_args = None
    cfg = jsonable(model.pretrained_cfg)
    return {
        "keras_version": keras.version(),
        "keras_convnext_version": _package_version(),
        "backend": keras.backend.backend(),
        "parameter_count": int(model.count_params()),
        "date": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),  # keras-hub's format
        "timm_architecture": model.timm_architecture,
        "timm_model_args": timm_args,
        "pretrained_cfg": cfg,
        "license": cfg.get("license"),
        "parity": parity,
    }


def parse_hub_uri(uri) -> str:
    """The repository id of "hf://owner/repo" (an upload target: no revision)."""
    match = _HUB_URI.match(str(uri))
    if not match or match[2]:
        raise PresetError(f"An upload goes to 'hf://owner/repo' (no revision), got {uri!r}.")
    return match[1]


def check_preset_target(directory) -> str:
    """`directory` if a preset can be written there: new, empty, or a preset (replaced);
    its parent writable. Else `PresetError`."""
    directory = os.fspath(directory)
    if os.path.isfile(directory) or (os.path.islink(directory) and not os.path.isdir(directory)):
        raise PresetError(f"Preset folder {directory!r} is a file.")
    if os.path.isdir(directory):
        entries = set(os.listdir(directory))
        if entries and CONFIG_FILE not in entries:
            raise PresetError(
                f"Preset folder {directory!r} holds other files ({', '.join(sorted(entries)[:5])}"
                "); give an empty or new folder (a preset folder is replaced whole)."
            )
    parent = os.path.dirname(os.path.abspath(directory))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise PresetError(
            f"Cannot write the preset folder {directory!r}: {parent!r} is not writable."
        )
    return directory


def save_preset(model, directory, *, parity="auto") -> str:
    """Write `model` (a `ConvNeXt`) as a keras-hub preset folder; returns its path.

    parity: "auto" measures it with the registered measure (weights_convert's: the
    model against timm's, built from the same weights), None leaves it out, a dict
    is recorded as it is. The folder appears whole or not at all: it is written
    beside its place and renamed into it (an existing preset there is replaced).
    """
    directory = check_preset_target(directory)
    if parity == "auto":
        parity = measure_parity(model)
    parent = os.path.dirname(os.path.abspath(directory))
    staging = tempfile.mkdtemp(prefix=".preset-", dir=parent)
    try:
        config = keras.saving.serialize_keras_object(model)
        for key in ("build_config", "compile_config"):  # keras-hub leaves them out too
            config.pop(key, None)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
        model.save_weights(os.path.join(staging, WEIGHTS_FILE))
        metadata = _metadata(model, parity)
        metadata["files"] = {
            name: {"sha256": _sha256(os.path.join(staging, name))}
            for name in (CONFIG_FILE, WEIGHTS_FILE)
        }
        with open(os.path.join(staging, METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=4)
        with open(os.path.join(staging, README_FILE), "w", encoding="utf-8") as f:
            f.write(model_card(model, metadata))
        os.chmod(staging, 0o777 & ~_umask())
        _replace_folder(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_folder(staging, directory):
    """Rename `staging` to `directory`; an existing preset there is moved aside first and
    removed after (so a reader sees the old preset or the new one, whole)."""
    if not os.path.exists(directory):
        os.rename(staging, directory)
        return
    old = tempfile.mkdtemp(prefix=".preset-old-", dir=os.path.dirname(os.path.abspath(directory)))
    os.rmdir(old)
    os.rename(directory, old)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(old, directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def _hub_fetch(repo_id, revision):
    """`fetch(filename, required) -> local path | None` for a Hub repository."""
    offline = not hub_reachable()

    def fetch(filename, required=True):
        try:
            return hub_download(repo_id, filename, revision, offline)
        except (EntryNotFoundError, LocalEntryNotFoundError) as error:
            if not required:
                return None
            if isinstance(error, LocalEntryNotFoundError):
                why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub is unreachable"
                raise PresetError(
                    f"Cannot get {filename} of hf://{repo_id}: {why} and it is not in the Hub "
                    f"cache ({hub_cache_dir() or 'the default cache'})."
                ) from None
            raise PresetError(f"hf://{repo_id} has no {filename}: not a complete preset.") from None
        except Exception as error:  # an unknown repository, auth, network
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise PresetError(f"Cannot get {filename} of hf://{repo_id}: {first}") from None

    return fetch


def _folder_fetch(folder):
    def fetch(filename, required=True):
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        if required:
            found = ", ".join(sorted(os.listdir(folder))[:8]) or "nothing"
            raise PresetError(
                f"Preset {folder!r} has no {filename} (found: {found}); a preset holds "
                f"{', '.join(PRESET_FILES)}."
            )
        return None

    return fetch


def parse_preset_source(source):
    """(kind, where, revision): ("hub", "owner/repo", revision or None) for
    "hf://owner/repo[@revision]", ("folder", path, None) for an existing folder."""
    if not isinstance(source, (str, os.PathLike)):
        raise PresetError(
            f"A preset is a folder or 'hf://owner/repo', got {type(source).__name__}."
        )
    text = os.fspath(source)
    match = _HUB_URI.match(text)
    if match:
        return "hub", match[1], match[2]
    if text.startswith("hf://"):
        raise PresetError(f"{text!r} is not a Hub preset name; use 'hf://owner/repo[@revision]'.")
    if not os.path.isdir(text):
        raise PresetError(
            f"Preset {text!r}: no such folder; a preset is a folder (written by "
            "save_to_preset) or 'hf://owner/repo'."
        )
    return "folder", text, None


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise PresetError(f"Cannot read the preset's {what}: {error}") from None
    if not isinstance(value, dict):
        raise PresetError(f"The preset's {what} is not a JSON object.")
    return value


def load_preset(cls, source):
    """The `cls` (`ConvNeXt`) model of a preset folder or "hf://owner/repo[@revision]";
    a timm repository through a registered reader. Raises `PresetError` for anything
    that is not a complete, unaltered ConvNeXt preset."""
    kind, where, revision = parse_preset_source(source)
    fetch = _hub_fetch(where, revision) if kind == "hub" else _folder_fetch(where)
    config = _read_json(fetch(CONFIG_FILE), CONFIG_FILE)
    if "class_name" not in config and "registered_name" not in config:
        return _read_other_layout(source, config)
    name = config.get("registered_name") or config.get("class_name")
    if name != REGISTERED_NAME:
        raise PresetError(
            f"{source}: its {CONFIG_FILE} describes {name!r}, not a ConvNeXt ({REGISTERED_NAME!r})."
        )
    metadata = _read_json(fetch(METADATA_FILE), METADATA_FILE)
    weights = fetch(WEIGHTS_FILE)
    _check_hashes(source, metadata, {CONFIG_FILE: fetch(CONFIG_FILE), WEIGHTS_FILE: weights})
    if not isinstance(config.get("config"), dict):
        raise PresetError(f"{source}: its {CONFIG_FILE} has no model config.")
    return _build(cls, source, config["config"], weights)


def _read_other_layout(source, config):
    for reader in _extensions(READER_GROUP, _READERS):
        model = reader(source, config)
        if model is not None:
            return model
    if "architecture" in config:
        raise PresetError(
            f"{source} is a timm checkpoint (config.json names architecture "
            f"{config['architecture']!r}); reading it needs this project's converter: install "
            "keras-convnext[convert] (its weights_convert registers the reader), or in a "
            "source checkout `import weights_convert.presets` first."
        )
    raise PresetError(
        f"{source}: its {CONFIG_FILE} is neither a keras-hub preset's (class_name, "
        "registered_name) nor a timm checkpoint's (architecture)."
    )


def _check_hashes(source, metadata, paths):
    files = metadata.get("files")
    if not isinstance(files, dict):
        return  # a preset written by hand: the structural checks still apply
    for name, path in paths.items():
        expected = (files.get(name) or {}).get("sha256")
        if expected is not None and _sha256(path) != expected:
            raise PresetError(
                f"{source}: {name} does not match the sha256 {METADATA_FILE} recorded when the "
                "preset was written (altered or damaged since); write the preset again."
            )


def _weight_entries(path) -> dict:
    import h5py  # a Keras dependency; only reading presets needs it

    entries = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                entries.__setitem__(name, obj.shape) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return entries


def _build(cls, source, model_config, weights_path):
    try:
        with FAST_LOAD.enabled():  # the weights are read from the file next
            model = cls.from_config(model_config)
    except (ValueError, TypeError, KeyError) as error:
        raise PresetError(f"{source}: its {CONFIG_FILE} is not a valid ConvNeXt: {error}") from None
    try:
        entries = _weight_entries(weights_path)
    except OSError as error:
        raise PresetError(
            f"{source}: {WEIGHTS_FILE} is not a Keras weights file ({error})."
        ) from None
    if len(entries) != len(model.weights):
        raise PresetError(
            f"{source}: {WEIGHTS_FILE} holds {len(entries)} tensors, the model of its "
            f"{CONFIG_FILE} has {len(model.weights)}: they are not of the same model."
        )
    try:
        model.load_weights(weights_path)
    except Exception as error:  # keras: shape mismatches, missing objects
        first = str(error).split("\n\n")[-1].splitlines()[0] if str(error) else ""
        raise PresetError(
            f"{source}: {WEIGHTS_FILE} does not fit the model of its {CONFIG_FILE} "
            f"({type(error).__name__}: {first})"
        ) from None
    return model


def check_preset(directory) -> dict:
    """The metadata of a complete, unaltered preset folder (a ConvNeXt's config.json,
    every file present, sha256s as recorded), else `PresetError`."""
    kind, where, _ = parse_preset_source(directory)
    if kind != "folder":
        raise PresetError(f"{directory!r} is not a local preset folder.")
    fetch = _folder_fetch(where)
    paths = {name: fetch(name) for name in PRESET_FILES}
    config = _read_json(paths[CONFIG_FILE], CONFIG_FILE)
    name = config.get("registered_name") or config.get("class_name")
    if name != REGISTERED_NAME:
        raise PresetError(f"{where}: its {CONFIG_FILE} describes {name!r}, not a ConvNeXt.")
    metadata = _read_json(paths[METADATA_FILE], METADATA_FILE)
    _check_hashes(where, metadata, {n: paths[n] for n in (CONFIG_FILE, WEIGHTS_FILE)})
    return metadata


def upload_preset(uri, directory) -> str:
    """Push a preset folder to the Hub repository `uri` ("hf://owner/repo"), as keras-hub's
    `upload_preset`: the folder is checked first (`check_preset`), the repository is
    created if needed, then `huggingface_hub.upload_folder`. Returns the repository id."""
    repo_id = parse_hub_uri(uri)
    check_preset(directory)
    huggingface_hub.create_repo(repo_id, exist_ok=True, repo_type="model")
    huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(directory),
        repo_type="model",
        commit_message="Upload a keras-convnext preset",
    )
    return repo_id
