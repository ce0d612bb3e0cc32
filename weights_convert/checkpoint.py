"""Reading a timm checkpoint: where it is (Hub id, file, folder), its safetensors
tensors (validated, memory-mapped, never unpickled) and its `config.json`
(validated), combined into `load_checkpoint(source) -> (state_dict, info)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct

import numpy as np
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from convnext_layers.errors import ConfigError
from convnext_layers.hub import hub_cache_dir, hub_download, hub_offline, hub_reachable
from convnext_layers.timm_args import split_timm_args
from weights_convert.architectures import (
    TENSOR_ARGS,
    architecture_config,
    canonical_architecture,
    check_architecture,
    infer_architecture,
)
from weights_convert.errors import (
    CheckpointConfigError,
    CheckpointError,
    CheckpointNotFoundError,
    UnsupportedArchitectureError,
)
from weights_convert.pretrained import (
    DEFAULT_MODEL,
    check_pretrained_cfg,
    complete_pretrained_cfg,
    fit_channels,
)
from weights_convert.sources import (  # re-exported: their home before sources.py
    _HUB_ID,
    PICKLE_SUFFIXES,
    hub_repo_id,
)

logger = logging.getLogger("weights_convert")


# ----------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------

_FLOAT_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ITEM_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicate_keys(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise CheckpointError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _read_header(path, name, size):
    if size < 8:
        raise CheckpointError(f"{name}: truncated safetensors file ({size} bytes).")
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{name}: truncated or not a safetensors file (header of {header_size} bytes, "
                f"file of {size})."
            )
        raw = f.read(header_size)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except CheckpointError as error:
        raise CheckpointError(f"{name}: corrupt safetensors header ({error}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(f"{name}: corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object).")
    return header, 8 + header_size


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, metadata) of a safetensors file, validated; F32/F16/F64 are memory-mapped.

    BF16 tensors are widened to float32 exactly. Raises `CheckpointError` for a
    truncated or corrupt file (malformed header or metadata, non-integer shapes
    or offsets, tensors whose byte ranges overlap, leave holes or run past the
    end) and for non-float tensors: the same files the safetensors library refuses.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    size = os.path.getsize(path)
    header, start = _read_header(path, name, size)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(
            f"{name}: corrupt safetensors header: __metadata__ must map strings to strings, "
            f"got {metadata!r:.80}."
        )
    entries = []
    for key, info in header.items():
        valid = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
        if valid:
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            valid = (
                isinstance(dtype, str)
                and dtype in _ITEM_SIZES
                and isinstance(shape, list)
                and all(_is_int(d) and d >= 0 for d in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]
                and offsets[1] - offsets[0] == math.prod(shape) * _ITEM_SIZES[dtype]
            )
        if not valid:
            raise CheckpointError(
                f"{name}: corrupt safetensors entry for {key!r}: {info!r:.120} (needs dtype, "
                "shape as non-negative ints, data_offsets [begin, end] matching the size)."
            )
        entries.append((offsets[0], offsets[1], key, dtype, tuple(shape)))
    # the tensors must tile the data buffer exactly: no overlap (aliased data), no hole
    entries.sort()
    position = 0
    for begin, end, key, _, _ in entries:
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CheckpointError(
                f"{name}: corrupt safetensors file: tensor {key!r} at bytes {begin}-{end} "
                f"{what} (expected to start at {position})."
            )
        position = end
    data_size = size - start
    if position > data_size:
        raise CheckpointError(
            f"{name}: truncated file: the tensors need {position} data bytes, the file has "
            f"{data_size}."
        )
    if position < data_size:
        raise CheckpointError(
            f"{name}: corrupt safetensors file: {data_size - position} bytes after the last tensor."
        )
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.zeros(0, np.uint8)
    tensors, non_float = {}, []
    for begin, end, key, dtype, shape in entries:
        if dtype not in _FLOAT_DTYPES and dtype != "BF16":
            non_float.append(f"{key} ({dtype})")
            continue
        raw = data[start + begin : start + end]
        if dtype == "BF16":
            bits = raw.view("<u2").astype(np.uint32) << 16
            tensors[key] = bits.view(np.float32).reshape(shape)
        else:
            tensors[key] = raw.view(_FLOAT_DTYPES[dtype]).reshape(shape)
    if non_float:
        raise CheckpointError(
            f"{name}: non-float tensors, not ConvNeXt weights: {', '.join(non_float)}."
        )
    return tensors, metadata


# ----------------------------------------------------------------------------
# Sources: Hub id, file, folder
# ----------------------------------------------------------------------------


def _local_hint(source):
    return (
        f"Pass a local checkpoint instead: load_timm('path/to/model.safetensors') or a folder "
        f"holding model.safetensors + config.json (as on the Hub); on the command line "
        f"`python -m weights_convert path/to/model.safetensors -o out.keras`. To fill the cache, "
        f"run once with network: load_timm({source!r})."
    )


def _hub_download(repo_id, revision, filename, required, offline):
    try:
        return hub_download(repo_id, filename, revision, offline)
    except LocalEntryNotFoundError as error:
        if not required and offline:
            return None
        cache = hub_cache_dir() or "the default Hugging Face cache"
        why = (
            "HF_HUB_OFFLINE is set and it is not in the cache"
            if hub_offline()
            else "the Hub is unreachable (no network) and it is not in the cache"
            if offline
            else f"it could not be downloaded ({type(error).__name__}) and is not in the cache"
        )
        raise CheckpointNotFoundError(
            f"Cannot get {filename} of {repo_id}: {why} ({cache}). " + _local_hint(repo_id)
        ) from None
    except EntryNotFoundError:
        if not required:
            return None
        raise CheckpointNotFoundError(
            f"{repo_id} has no {filename}; only safetensors checkpoints are read (a pickled "
            ".pth/.bin is never loaded). " + _local_hint(repo_id)
        ) from None
    except Exception as error:  # network, auth, unknown repo
        if not required:
            return None
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointNotFoundError(
            f"Cannot get {filename} of {repo_id} from the Hugging Face Hub "
            f"({type(error).__name__}: {first_line}). " + _local_hint(repo_id)
        ) from None


def _check_readable_file(path, what):
    if os.path.islink(path) and not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what} {path!r} is a broken or looping symbolic link.")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what} {path!r} is not a file.")
    if not os.access(path, os.R_OK):
        raise CheckpointNotFoundError(f"{what} {path!r} is not readable (permission denied).")


def resolve_source(source) -> tuple[str, str | None, str | None]:
    """(safetensors path, config.json path or None, Hub repo id or None) of a source.

    A folder gives its model.safetensors and config.json; a `.safetensors` file
    is read alone (a config.json beside it is not used: pass the folder for
    that); anything else shaped like `owner/name[.tag]` is a Hub id.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointNotFoundError(
            f"A checkpoint source is a path or a Hub id string, got {type(source).__name__}."
        )
    text = os.fspath(source)
    if not text.strip():
        raise CheckpointNotFoundError("The checkpoint source is empty.")
    if os.path.islink(text) and not os.path.exists(text):
        raise CheckpointNotFoundError(f"{text!r} is a broken or looping symbolic link.")
    if os.path.isdir(text):
        weights = os.path.join(text, "model.safetensors")
        if not os.path.lexists(weights):
            found = ", ".join(sorted(os.listdir(text))[:10]) or "nothing"
            raise CheckpointNotFoundError(
                f"Folder {text!r} has no model.safetensors (found: {found}); only safetensors "
                "checkpoints are read."
            )
        _check_readable_file(weights, "The checkpoint")
        config = os.path.join(text, "config.json")
        if os.path.lexists(config):
            _check_readable_file(config, "The checkpoint config")
            return weights, config, None
        return weights, None, None
    if os.path.exists(text):
        _check_readable_file(text, "The checkpoint")
        if text.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(
                f"{text!r} is a pickled PyTorch file; only safetensors checkpoints are read (a "
                "pickle can run code when loaded). Convert it with safetensors.torch.save_file "
                "where you trust it."
            )
        if not text.endswith(".safetensors"):
            raise CheckpointError(
                f"{text!r} is not a .safetensors file. A checkpoint source is a Hub id, a "
                ".safetensors file or a folder holding model.safetensors (+ config.json)."
            )
        beside = os.path.join(os.path.dirname(os.path.abspath(text)), "config.json")
        if os.path.exists(beside):
            logger.info(
                "Using %s alone; the config.json beside it is not read (pass the folder to use "
                "it).",
                text,
            )
        return text, None, None
    repo_id = hub_repo_id(text)
    if repo_id is not None:
        revision = _HUB_ID.match(text)[2]
        offline = not hub_reachable()
        config = _hub_download(repo_id, revision, "config.json", False, offline)
        if config is not None:  # a refused architecture costs no weights download
            timm_model_args(read_config_json(config), None)
        weights = _hub_download(repo_id, revision, "model.safetensors", True, offline)
        return weights, config, repo_id
    raise CheckpointNotFoundError(
        f"{text!r} is neither an existing file / folder nor a Hub id like {DEFAULT_MODEL!r}."
    )


# ----------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------


def read_config_json(path) -> dict:
    """timm's config.json, checked: a JSON object whose known fields have the right
    types (`CheckpointConfigError` naming the file and the field otherwise)."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointConfigError(f"Cannot read {name}: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointConfigError(f"{name} must hold a JSON object, got {type(config).__name__}.")

    def fail(key, expected):
        raise CheckpointConfigError(f"{name}: {key} must be {expected}, got {config[key]!r:.80}.")

    if "architecture" in config and (
        not isinstance(config["architecture"], str) or not config["architecture"].strip()
    ):
        fail("architecture", "a timm architecture name string")
    if "num_classes" in config and (
        not isinstance(config["num_classes"], int) or isinstance(config["num_classes"], bool)
        or config["num_classes"] < 0
    ):  # fmt: skip
        fail("num_classes", "an int >= 0")
    for key in ("model_args", "pretrained_cfg"):
        if key in config and config[key] is not None and not isinstance(config[key], dict):
            fail(key, "a JSON object")
    if "global_pool" in config and config["global_pool"] is not None:
        try:
            split_timm_args({"global_pool": config["global_pool"]})
        except ConfigError:
            fail("global_pool", "'avg', 'max', 'avgmax' or 'catavgmax'")
    config["pretrained_cfg"] = check_pretrained_cfg(
        config.get("pretrained_cfg") or {}, f"{name}: pretrained_cfg"
    )
    return config


# ----------------------------------------------------------------------------
# load_checkpoint
# ----------------------------------------------------------------------------


def classifier_size(state_dict) -> int:
    """Rows of head.fc.weight (0 without a classifier); a malformed one is refused."""
    fc = state_dict.get("head.fc.weight")
    if fc is None:
        return 0
    if np.ndim(fc) != 2:
        raise CheckpointError(
            f"head.fc.weight must be a 2-D (classes, features) matrix, found shape "
            f"{tuple(np.shape(fc))}."
        )
    return int(np.shape(fc)[0])


def timm_model_args(config: dict, arch: str | None) -> tuple[str | None, dict, dict]:
    """(architecture name or None, model_args, model options) of a config.json, checked
    before any weight is read: an unknown architecture, or a timm argument the Keras
    models cannot compute exactly, is refused naming it. `arch` overrides the file's
    architecture and model_args entirely."""
    if arch is not None:
        name, model_args = canonical_architecture(arch), {}
    else:
        name = (
            canonical_architecture(config["architecture"]) if config.get("architecture") else None
        )
        model_args = dict(config.get("model_args") or {})
    if name is not None:
        check_architecture(name)
    try:
        _, options = split_timm_args(model_args)
        if "pooling" not in options and config.get("global_pool") and arch is None:
            _, options = split_timm_args({**model_args, "global_pool": config["global_pool"]})
    except ConfigError as error:
        where = f"config.json builds {name or 'the checkpoint'} with"
        raise UnsupportedArchitectureError(f"{where} {error}") from None
    if name is not None:
        architecture_config(name, model_args)  # every value checked, still no tensor read
    return name, model_args, options


FACE_CROP_SIZE = (112, 112)  # insightface's aligned face crop (embedding.faces aligns to it)


def head_is_embedding(info: dict) -> bool:
    """Whether a checkpoint's classifier is its embedding layer rather than class logits:
    a face-recognition ConvNeXt (trained with a margin loss such as CosFace / ArcFace
    whose class weights are not in the checkpoint; its `head.fc` gives the 512-d face
    embedding) takes the 112x112 aligned face crop as input. `pretrained_cfg`
    "embedding_head" (true / false) says so explicitly where present."""
    cfg = info.get("pretrained_cfg") or {}
    if isinstance(cfg.get("embedding_head"), bool):
        return cfg["embedding_head"]
    size = tuple(cfg.get("input_size") or ())[-2:]
    return bool(info.get("num_classes")) and size == FACE_CROP_SIZE


def load_checkpoint(source, *, arch: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict, info) of a Hub id, a .safetensors file or a folder.

    state_dict maps timm names to float numpy arrays (memory-mapped where the
    dtype allows). info has:
      "architecture": timm's name (`arch`, else config.json's, else inferred);
      "convnext_config": the `ConvNeXtConfig` (config.json's model_args applied);
      "num_classes": the checkpoint's classifier size (0 without one);
      "pooling": timm's global_pool ("avg", "max", "avgmax", "catavgmax");
      "drop_rate", "drop_path_rate": timm's training-time dropout and stochastic
          depth, kept for fine-tuning;
      "pretrained_cfg": timm's, completed from timm's registry when importable,
          else timm's ConvNeXt defaults; its mean / std / input_size fitted to the
          input channels (`pretrained.fit_channels`);
      "source": the source as given.
    """
    weights, config_path, repo_id = resolve_source(source)
    config = read_config_json(config_path) if config_path is not None else {}
    name, model_args, options = timm_model_args(config, arch)
    state_dict, _ = read_safetensors(weights)
    tag = None
    if repo_id and "." in repo_id.rsplit("/", 1)[-1]:
        tag = repo_id.rsplit("/", 1)[-1].split(".", 1)[1]
    if name is None:
        name = infer_architecture(state_dict)
    # arch= names the network: only the input channels come from the tensors then
    from_tensors = ("in_chans",) if arch is not None else TENSOR_ARGS
    convnext_config = architecture_config(name, model_args, state_dict, from_tensors)
    num_classes = classifier_size(state_dict)
    pretrained_cfg = complete_pretrained_cfg(name, config["pretrained_cfg"] if config else {},
                                             num_classes, tag)  # fmt: skip
    pretrained_cfg = fit_channels(pretrained_cfg, convnext_config.in_chans)
    info = {
        "architecture": name,
        "convnext_config": convnext_config,
        "num_classes": num_classes,
        "pooling": options.get("pooling", "avg"),
        "drop_rate": float(options.get("drop_rate") or 0.0),
        "drop_path_rate": float(options.get("drop_path_rate") or 0.0),
        "pretrained_cfg": pretrained_cfg,
        "source": os.fspath(source),
    }
    return state_dict, info
