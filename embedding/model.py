"""Embedding models: a `ConvNeXt` whose head ends at timm's pre-logits features,
L2-normalised; no classifier.

    model = build_model("timm/convnext_atto.d2_in1k")   # (None, None, None, 3) -> (None, 320)
    e = compute_embedding(model, x)   # (H, W, 3) -> (1, D); (N, H, W, 3) -> (N, D)

With the defaults (`pooling="avg"`, `head_norm=True`, `normalize=True`) the
output is timm's pre-logits feature, `forward_head(forward_features(x),
pre_logits=True)` (global average pool, then the head norm, then for
convnext_large_mlp the head's Dense + GELU), L2-normalised: an ordinary
`ConvNeXt(..., num_classes=0, normalize=True)`, so it saves and loads like any
other and knows its preprocessing (`model.pretrained_cfg`).

Converted models are cached on disk as `.keras` files (see `ModelCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings

import keras
import numpy as np

import weights_convert
from convnext_layers import POOLINGS, ConvNeXt, GeneralizedMeanPooling
from embedding.errors import ModelUnavailableError

__all__ = [
    "DEFAULT_MODEL",
    "GeneralizedMeanPooling",
    "ModelCache",
    "ModelUnavailableError",
    "build_model",
    "compute_embedding",
    "embedding_dim",
    "embedding_model_from_state",
]

DEFAULT_MODEL = weights_convert.DEFAULT_MODEL
CACHE_ENV = "KERAS_CONVNEXT_CACHE"
CACHE_FORMAT = 2  # bump when the cached model layout changes (2: ConvNeXt models)


# ----------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------


def load_checkpoint(source):
    """`weights_convert.load_checkpoint`, with the command line's advice when a Hub id
    cannot be had (no network and no cached copy: a `ModelUnavailableError`)."""
    try:
        return weights_convert.load_checkpoint(source)
    except weights_convert.CheckpointNotFoundError as error:
        if weights_convert.hub_repo_id(source) is None:
            raise  # a local path: FileNotFoundError naming it
        raise ModelUnavailableError(
            f"{error} On the command line: --model path/to/folder (holding "
            "model.safetensors + config.json, as on the Hub) or --model "
            "path/to/model.safetensors (Python: build_model(path) / Embedder(path))."
        ) from error


# ----------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------


def _check_options(pooling, head_norm, normalize):
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}.")
    if not isinstance(head_norm, bool) or not isinstance(normalize, bool):
        raise TypeError("head_norm and normalize must be True or False.")


def embedding_model_from_state(
    state_dict,
    info,
    *,
    pooling="avg",
    head_norm=True,
    normalize=True,
    input_shape=None,
    gem_p=3.0,
) -> ConvNeXt:
    """The embedding `ConvNeXt` for a `weights_convert.load_checkpoint` (state_dict, info),
    ported strictly (the classifier's tensors are left out)."""
    _check_options(pooling, head_norm, normalize)

    def build():
        return weights_convert.keras_model_for(
            info,
            num_classes=0,
            pooling=pooling,
            head_norm=head_norm,
            normalize=normalize,
            input_shape=input_shape,
            name=f"{info.get('architecture', 'convnext')}_embedding",
        )

    return weights_convert.build_ported(build, state_dict)


def as_embedding_model(model, *, pooling="avg", head_norm=True, gem_p=3.0):
    """An embedding model from a saved or built one: a `ConvNeXt` that already ends in
    L2-normalised vectors is used as it is (its head was trained that way); any other
    `ConvNeXt` gets the embedding head (pre-logits, L2), keeping its weights; a model
    from an older file must already end in a `UnitNormalization`."""
    if isinstance(model, ConvNeXt):
        if model.normalize and model.include_top:
            return model
        return model.with_head(
            include_top=True,
            num_classes=0,
            pooling=pooling,
            head_norm=head_norm,
            normalize=True,
            gem_p=gem_p,
            output_stages=None,
            name=f"{model.timm_architecture or model.name}_embedding",
        )
    last = model.layers[-1] if model.layers else None
    if len(model.output_shape) == 2 and isinstance(last, keras.layers.UnitNormalization):
        return model
    raise ValueError(
        f"{model.name!r} is not an embedding model (it does not end in L2-normalised vectors) "
        "and is not a ConvNeXt model that could be given one; convert the checkpoint again "
        "with this version."
    )


def embedding_dim(model: keras.Model) -> int:
    """Length of the embedding vectors `model` produces."""
    return int(model.output_shape[-1])


# ----------------------------------------------------------------------------
# Disk cache
# ----------------------------------------------------------------------------


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "keras-convnext"
    )


def _file_stamp(path):
    stat = os.stat(path)
    return [os.path.basename(path), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(source) -> str | None:
    """What identifies the checkpoint's content, without the network; None if unknown.

    Local files: absolute path, size and mtime of the weights and config. Hub
    ids: the content hash (blob name) of the Hub cache's model.safetensors.
    """
    source = os.fspath(source)
    if weights_convert.hub_repo_id(source) is None:
        path = os.path.abspath(source)
        files = [path]
        if os.path.isdir(path):
            files = [
                os.path.join(path, n)
                for n in ("model.safetensors", "config.json")
                if os.path.exists(os.path.join(path, n))
            ]
        return json.dumps([path, [_file_stamp(f) for f in files]])
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(weights_convert.hub_repo_id(source), "model.safetensors")
    if not isinstance(cached, str):
        return None
    return json.dumps(
        ["hub", weights_convert.hub_repo_id(source), os.path.basename(os.path.realpath(cached))]
    )


class ModelCache:
    """Converted embedding models as `.keras` files, keyed by source, content and options.

    Directory: `cache_dir`, else `$KERAS_CONVNEXT_CACHE`, else
    `~/.cache/keras-convnext`. Each entry is `<key>.keras` (a `ConvNeXt`, which
    knows its architecture and preprocessing) + `<key>.json` (the source and
    options it was made from), both written atomically. A Hub id whose
    file is gone from the Hub cache still finds its entry through a per-source
    alias, so a converted model keeps working offline.
    """

    def __init__(self, cache_dir=None):
        self.dir = os.fspath(cache_dir) if cache_dir else default_cache_dir()

    @staticmethod
    def _hash(payload) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _options(self, source, options):
        return {"source": os.fspath(source), "options": options, "format": CACHE_FORMAT}

    def key(self, source, options, fingerprint) -> str:
        return self._hash({**self._options(source, options), "fingerprint": fingerprint})

    def _alias_path(self, source, options):
        return os.path.join(
            self.dir, "aliases", self._hash(self._options(source, options)) + ".txt"
        )

    def lookup(self, source, options) -> str | None:
        """The key of a usable cached entry, or None."""
        fingerprint = source_fingerprint(source)
        if fingerprint is not None:
            key = self.key(source, options, fingerprint)
        elif weights_convert.hub_repo_id(os.fspath(source)) is not None:
            try:
                with open(self._alias_path(source, options)) as f:
                    key = f.read().strip()
            except OSError:
                return None
        else:
            return None
        ok = all(os.path.exists(os.path.join(self.dir, key + e)) for e in (".keras", ".json"))
        return key if ok else None

    def load(self, key) -> keras.Model:
        # load_converted skips the random initialisation the saved weights replace
        return weights_convert.load_converted(os.path.join(self.dir, key + ".keras"))

    def store(self, source, options, model) -> str | None:
        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            return None
        key = self.key(source, options, fingerprint)
        meta = {
            "source": os.fspath(source),
            "options": options,
            "architecture": model.timm_architecture,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        weights_convert.save_converted(model, os.path.join(self.dir, key + ".keras"))
        weights_convert.atomic_write_text(
            os.path.join(self.dir, key + ".json"), json.dumps(meta, indent=1)
        )
        if weights_convert.hub_repo_id(os.fspath(source)) is not None:
            weights_convert.atomic_write_text(self._alias_path(source, options), key)
        return key


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def build_model(
    source=DEFAULT_MODEL,
    *,
    pooling: str = "avg",
    head_norm: bool = True,
    normalize: bool = True,
    input_shape=None,
    gem_p: float = 3.0,
    cache: bool = True,
    cache_dir=None,
    verbose: bool = False,
) -> keras.Model:
    """A ConvNeXt embedding model (backbone + pooling + head norm + L2), no classifier.

    Args:
        source: anything `weights_convert.load_timm` takes (a Hub id such as
            "timm/convnext_atto.d2_in1k", a `.safetensors` file, a folder with
            model.safetensors + config.json), or a `.keras` file this project
            wrote (converted or fine-tuned; see `as_embedding_model`).
        pooling: "avg" (timm's), "max", or "gem" (`GeneralizedMeanPooling`,
            learnable p starting at `gem_p`).
        head_norm: apply timm's head norm after pooling (timm's pre-logits).
        normalize: L2-normalise the output (`keras.layers.UnitNormalization`).
        input_shape: (H, W, 3); default (None, None, 3): any size (the
            `Embedder` resizes to the checkpoint's `pretrained_cfg` input size).
        cache: reuse / store the converted model in the disk cache (`ModelCache`).

    Returns a `ConvNeXt` (B, H, W, 3) -> (B, D) that knows its `pretrained_cfg`
    and `timm_architecture`; `embedding_dim(model)` gives D (320 for
    convnext_atto).
    """
    _check_options(pooling, head_norm, normalize)
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".keras"):
        model = weights_convert.load_converted(source)
        return as_embedding_model(model, pooling=pooling, head_norm=head_norm, gem_p=gem_p)
    options = {
        "pooling": pooling,
        "head_norm": head_norm,
        "normalize": normalize,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "gem_p": float(gem_p) if pooling == "gem" else None,
    }
    store = ModelCache(cache_dir) if cache else None
    if store is not None:
        key = store.lookup(source, options)
        if key is not None:
            try:
                model = store.load(key)
                if verbose:
                    print(f"Loaded converted model from cache {store.dir}")
                return model
            except Exception as error:  # a damaged entry: rebuild it
                warnings.warn(f"Ignoring unreadable cache entry {key}: {error}", stacklevel=2)
    state_dict, config = load_checkpoint(source)
    model = embedding_model_from_state(
        state_dict,
        config,
        pooling=pooling,
        head_norm=head_norm,
        normalize=normalize,
        input_shape=input_shape,
        gem_p=gem_p,
    )
    if store is not None:
        try:
            store.store(source, options, model)
        except OSError as error:
            warnings.warn(f"Could not write model cache in {store.dir}: {error}", stacklevel=2)
    return model


def padded_size(n: int, batch_size: int) -> int:
    """Batch size a group of `n` images is padded to: the next power of two, at most
    `batch_size` (so a run compiles at most log2(batch_size) + 1 shapes)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size) if n <= batch_size else n


def predict_padded(model: keras.Model, batch: np.ndarray, batch_size: int) -> np.ndarray:
    """`model` on up to `batch_size` images, zero-padded to `padded_size`: the one
    place batches are run (`ConvNeXt.predict_batch`, the light inference entry
    point, for ConvNeXt models; `predict_on_batch` for any other model)."""
    n = batch.shape[0]
    size = padded_size(n, batch_size)
    if size != n:
        pad = np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, pad], axis=0)
    if isinstance(model, ConvNeXt):
        out = model.predict_batch(batch)
    else:
        out = model.predict_on_batch(batch)
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)[:n]


def compute_embedding(model: keras.Model, images, batch_size: int = 32) -> np.ndarray:
    """Embeddings of preprocessed images: (H, W, 3) -> (1, D), (N, H, W, 3) -> (N, D).

    `images` are already normalised (see `embedding.Preprocessor`), as numpy or
    backend tensors. Runs in chunks of `batch_size` (the last padded, see
    `padded_size`); returns float32 numpy.
    """
    x = np.asarray(keras.ops.convert_to_numpy(images), dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"Expected (H, W, 3) or (N, H, W, 3) images, got shape {x.shape}.")
    expected = tuple(model.input_shape[1:])
    if any(e is not None and e != s for e, s in zip(expected, x.shape[1:], strict=True)):
        raise ValueError(
            f"Images of shape {x.shape[1:]} do not fit the model input {expected}; "
            "preprocess them with the model's Preprocessor first."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if x.shape[0] == 0:
        return np.zeros((0, embedding_dim(model)), dtype=np.float32)
    parts = [
        predict_padded(model, x[i : i + batch_size], batch_size)
        for i in range(0, x.shape[0], batch_size)
    ]
    return np.concatenate(parts, axis=0)
