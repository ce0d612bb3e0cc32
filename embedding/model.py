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
from huggingface_hub import try_to_load_from_cache
from safetensors.numpy import save_file

import weights_convert
from convnext_common.files import atomic_path, atomic_write_text
from convnext_layers import POOLINGS, ConvNeXt, GeneralizedMeanPooling, fast_ops
from convnext_layers.dtypes import check_dtype
from embedding.errors import ModelSourceError, ModelUnavailableError

__all__ = [
    "DEFAULT_MODEL",
    "GeneralizedMeanPooling",
    "ModelCache",
    "ModelUnavailableError",
    "build_model",
    "compute_embedding",
    "in_dtype",
    "embedding_dim",
    "embedding_model_from_state",
    "enable_compilation_cache",
]

DEFAULT_MODEL = weights_convert.DEFAULT_MODEL
CACHE_ENV = "KERAS_CONVNEXT_CACHE"
CACHE_FORMAT = 3  # bump when the cached model layout changes (3: safetensors + config)


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
            gem_p=gem_p,
            input_shape=input_shape,
            name=f"{info.get('architecture', 'convnext')}_embedding",
        )

    return weights_convert.build_ported(build, state_dict)


PROJECTION_NAME = "embedding_projection"  # the Dense projection given to other Keras models
NORMALIZE_NAME = "embedding_l2"
CLASSIFIER_NAME = "head_fc"  # a ConvNeXt's last Dense: its classifier, or its projection
# the layers of an embedding model that project features to the embedding (trained even
# with the backbone frozen): the one place the head is found by name
PROJECTION_NAMES = (PROJECTION_NAME, CLASSIFIER_NAME)


def as_embedding_model(
    model: keras.Model,
    embedding_dim: int | None = None,
    *,
    pooling: str = "avg",
    head_norm: bool = True,
    gem_p: float = 3.0,
) -> keras.Model:
    """An embedding model (B, H, W, 3) -> L2-normalised (B, D) from any image model.

    - A `ConvNeXt` that already ends in L2-normalised vectors is used as it is (its
      head was trained that way) unless `embedding_dim` asks for another projection.
      Any other `ConvNeXt` (a converted classifier, a backbone) gets the embedding
      head with its weights kept (`ConvNeXt.with_head`): timm's pre-logits (pooling,
      head norm), then, with `embedding_dim`, a fresh Dense projection (`head_fc`),
      then L2.
    - Another Keras model (e.g. one loaded from an older file, or your own
      backbone): a classifier (`head_fc`) gives its input, a feature map is
      average-pooled, `embedding_dim` adds a Dense projection (`embedding_projection`),
      then `UnitNormalization`.
    Raises ValueError for a model that does not take one (B, H, W, C) image input.
    """
    inputs = model.inputs
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise ValueError(
            f"{model.name!r} is not an image model (its inputs are "
            f"{[tuple(i.shape) for i in inputs]}); a fine-tuning checkpoint (train.keras) is "
            "not a model to embed with, the finished fine-tuning output is"
        )
    if isinstance(model, ConvNeXt):
        if model.normalize and model.include_top and embedding_dim is None:
            return model
        return model.with_head(
            include_top=True,
            num_classes=int(embedding_dim or 0),
            pooling=pooling if not model.include_top else (model.pooling or pooling),
            head_norm=head_norm,
            normalize=True,
            gem_p=gem_p,
            output_stages=None,
            classifier_activation=None,
            name=f"{model.timm_architecture or model.name}_embedding",
        )
    cfg = getattr(model, "pretrained_cfg", None)
    arch = getattr(model, "timm_architecture", None)
    last = model.layers[-1]
    normalized = isinstance(last, keras.layers.UnitNormalization)
    if len(model.output_shape) == 2 and normalized and embedding_dim is None:
        return model
    # L2's input, or the classifier's (pre-logits), else the output itself
    features = last.input if normalized or last.name == CLASSIFIER_NAME else model.output
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(features)
    elif len(features.shape) != 2:
        raise ValueError(f"Cannot make embeddings from an output of shape {features.shape}.")
    if embedding_dim is not None:
        features = keras.layers.Dense(int(embedding_dim), name=PROJECTION_NAME)(features)
    out = keras.layers.UnitNormalization(axis=-1, name=NORMALIZE_NAME)(features)
    result = keras.Model(model.input, out, name=model.name)
    object.__setattr__(result, "pretrained_cfg", dict(cfg or {}))
    object.__setattr__(result, "timm_architecture", arch)
    return result


def in_dtype(model: keras.Model, dtype: str) -> keras.Model:
    """`model` computing in `dtype` ("float32" or "bfloat16"). A `ConvNeXt`
    is rebuilt with its weights cast (`ConvNeXt.with_head(dtype=...)`: the body in
    bfloat16, normalisation statistics, GRN and the head with the L2 in float32);
    float32 keeps a float32 model as it is. Another Keras model cannot keep its
    norms and head in float32 this way: a ValueError."""
    dtype = check_dtype(dtype) or "float32"
    if isinstance(model, ConvNeXt):
        current = model.get_config()["dtype"] or "float32"
        if current == dtype and model.compute_dtype == dtype:
            return model
        return model.with_head(dtype=dtype)
    if dtype == "float32" and model.compute_dtype == "float32":
        return model
    raise ValueError(
        f"dtype={dtype!r} needs a ConvNeXt model (this project's); {model.name!r} is a "
        f"{type(model).__name__} computing in {model.compute_dtype}."
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
    cached = try_to_load_from_cache(weights_convert.hub_repo_id(source), "model.safetensors")
    if not isinstance(cached, str):
        return None
    return json.dumps(
        ["hub", weights_convert.hub_repo_id(source), os.path.basename(os.path.realpath(cached))]
    )


class ModelCache:
    """Converted embedding models on disk, keyed by source, content and options.

    Directory: `cache_dir`, else `$KERAS_CONVNEXT_CACHE`, else
    `~/.cache/keras-convnext`. Each entry is `<key>.safetensors` (the model's
    weights in Keras' own layout, by variable path) + `<key>.json` (the model's
    `get_config`, and the source and options it was made from), both written
    atomically. Loading one is cheaper than converting the checkpoint again: the
    tensors are memory-mapped and need no transposing, the config needs no
    inference, and no variable is randomly initialised first. A Hub id whose file
    is gone from the Hub cache still finds its entry through a per-source alias,
    so a converted model keeps working offline.
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
        found = (os.path.exists(os.path.join(self.dir, key + e)) for e in (".safetensors", ".json"))
        return key if all(found) else None

    def load(self, key) -> ConvNeXt:
        with open(os.path.join(self.dir, key + ".json"), encoding="utf-8") as f:
            meta = json.load(f)
        weights, _ = weights_convert.read_safetensors(os.path.join(self.dir, key + ".safetensors"))
        return ConvNeXt.from_config(meta["model"], weights=weights)

    def store(self, source, options, model) -> str | None:
        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            return None
        key = self.key(source, options, fingerprint)
        meta = {
            "source": os.fspath(source),
            "options": options,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "model": model.get_config(),
        }
        weights = model.weights_by_path()
        with atomic_path(os.path.join(self.dir, key + ".safetensors")) as tmp:
            save_file(weights, tmp)
        atomic_write_text(os.path.join(self.dir, key + ".json"), json.dumps(meta, indent=1))
        if weights_convert.hub_repo_id(os.fspath(source)) is not None:
            atomic_write_text(self._alias_path(source, options), key)
        return key


def enable_compilation_cache(cache_dir=None) -> str | None:
    """Keep JAX's compiled executables on disk, in `<cache_dir>/xla` (default the model
    cache's folder), so a later process skips XLA's compilation of the same model and
    batch shape: the first embedding of `python -m embedding embed` went from 8.0 s to
    1.3 s on a loaded 2-core CPU (convnext_atto, 224 px). Process-wide JAX setting, so
    opt-in (the command line turns it on unless --no-cache); a compilation cache the
    user configured (JAX_COMPILATION_CACHE_DIR) wins. No-op on other backends.
    Returns the folder in use, or None."""
    if keras.backend.backend() != "jax":
        return None
    import jax  # the JAX backend is the one in use here

    folder = jax.config.jax_compilation_cache_dir
    if folder is None:
        folder = os.path.join(os.fspath(cache_dir) if cache_dir else default_cache_dir(), "xla")
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


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
    dtype: str = "float32",
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
        dtype: "float32" or "bfloat16" (`in_dtype`: the body in bfloat16, the
            normalisation statistics and the head with its L2 in float32; the
            cache keeps the float32 model).

    Returns a `ConvNeXt` (B, H, W, 3) -> (B, D) that knows its `pretrained_cfg`
    and `timm_architecture`; `embedding_dim(model)` gives D (320 for
    convnext_atto).
    """
    _check_options(pooling, head_norm, normalize)
    dtype = check_dtype(dtype) or "float32"
    if _source_kind(source) == "keras":
        model = weights_convert.load_converted(source)
        model = as_embedding_model(model, pooling=pooling, head_norm=head_norm, gem_p=gem_p)
        return in_dtype(model, dtype)
    options = {
        "pooling": pooling,
        "head_norm": head_norm,
        "normalize": normalize,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "gem_p": float(gem_p) if pooling == "gem" else None,
    }
    store = ModelCache(cache_dir) if cache else None
    cached = _from_cache(store, source, options, dtype, verbose) if store is not None else None
    if cached is not None:
        return cached
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
        _to_cache(store, source, options, model)
    return in_dtype(model, dtype)


def _source_kind(source) -> str:
    """`weights_convert.source_kind` of a model source that `build_model` can build from:
    `CheckpointNotFoundError` for a missing one (a TypeError for what is no source),
    `ModelSourceError` for an .onnx export."""
    problem = weights_convert.source_problem(source)  # a TypeError for what is no source
    if problem is not None:
        raise weights_convert.CheckpointNotFoundError(
            f"Model source {os.fspath(source)!r}: {problem}."
        )
    kind = weights_convert.source_kind(source)
    if kind == "onnx":
        raise ModelSourceError(
            os.fspath(source),
            "an .onnx export runs with onnxruntime, not Keras: "
            "embedding.onnx_embedder.OnnxEmbedder, or `python -m embedding serve --model`",
        )
    return kind


def _from_cache(store: ModelCache, source, options, dtype: str, verbose: bool):
    """The cached model of `source` with `options`, in `dtype`, or None (no entry, or a
    damaged one, which `build_model` then rebuilds; warned about at its caller)."""
    key = store.lookup(source, options)
    if key is None:
        return None
    try:
        model = store.load(key)
        if verbose:
            print(f"Loaded converted model from cache {store.dir}")
        return in_dtype(model, dtype)
    except Exception as error:  # a damaged entry: rebuild it
        warnings.warn(f"Ignoring unreadable cache entry {key}: {error}", stacklevel=3)
        return None


def _to_cache(store: ModelCache, source, options, model) -> None:
    """Store the converted model; a cache that cannot be written is warned about (at
    `build_model`'s caller), not an error."""
    try:
        store.store(source, options, model)
    except OSError as error:
        warnings.warn(f"Could not write model cache in {store.dir}: {error}", stacklevel=3)


def padded_size(n: int, batch_size: int, compiles_per_size: bool | None = None) -> int:
    """Batch size a group of `n` images runs at. Where the backend compiles once per
    batch size (`compiles_per_size`, default `fast_ops.compiles_per_batch_size()`: JAX),
    the next power of two, at most `batch_size`, so that a run compiles at most
    log2(batch_size) + 1 shapes; elsewhere `n` itself (a padded row costs as much as an
    image). Never less than `n`."""
    if compiles_per_size is None:
        compiles_per_size = fast_ops.compiles_per_batch_size()
    if n > batch_size or not compiles_per_size:
        return n
    size = 1
    while size < n:
        size *= 2
    return min(size, batch_size)


def predict_padded(
    model: keras.Model, batch: np.ndarray, batch_size: int, distribution=None
) -> np.ndarray:
    """`model` on up to `batch_size` images, zero-padded: the one place batches are run.

    Without a distribution the batch is padded to `padded_size` (a power of two on
    JAX, not padded on TensorFlow and torch) and run by `ConvNeXt.predict_batch` (the
    light inference entry point) or, for any other model, `predict_on_batch`. Under a
    `keras.distribution` (its variables created under it:
    `embedding.distribution.clone_under`) it is padded to the full `batch_size`, so
    that every device gets an equal share, and run in its scope.
    Returns (n, D) float32 numpy. Under a distribution over several processes, `batch`
    is this process's share and so are the rows returned.
    """
    n = batch.shape[0]
    size = padded_size(n, batch_size) if distribution is None else max(n, batch_size)
    if size != n:
        pad = np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, pad], axis=0)
    if distribution is not None:
        with distribution.scope():
            out = model.predict_on_batch(batch)
    elif isinstance(model, ConvNeXt):
        out = model.predict_batch(batch)
    else:
        out = model.predict_on_batch(batch)
    return _local_rows(out)[:n]


def _local_rows(out) -> np.ndarray:
    """A model's output as float32 numpy: all of it, or (a JAX array spread over several
    processes) the rows of this process's devices, in order."""
    if getattr(out, "is_fully_addressable", True):
        return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)
    shards = sorted(out.addressable_shards, key=lambda shard: shard.index[0].start or 0)
    return np.concatenate([np.asarray(shard.data, dtype=np.float32) for shard in shards])


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
