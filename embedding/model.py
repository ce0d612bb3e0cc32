"""Embedding models: a ConvNeXt backbone + pooling (+ head LayerNorm) (+ L2), no classifier.

    model = build_model("timm/convnext_atto.d2_in1k")   # (None, 224, 224, 3) -> (None, 320)
    e = compute_embedding(model, x)   # (H, W, 3) -> (1, D); (N, H, W, 3) -> (N, D)

With the defaults (`pooling="avg"`, `head_norm=True`, `normalize=True`) the
output is timm's pre-logits feature, `forward_head(forward_features(x),
pre_logits=True)` (global average pool, then the head LayerNorm), L2-normalised.
The head LayerNorm is named `head_norm`, so the converter gives it timm's
`head.norm` weights; the classifier (`head.fc`) is not built and its weights
are dropped.

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
from keras import ops

import weights_convert
from convnext_layers import LAYER_NORM_EPSILON
from embedding.errors import ModelUnavailableError

DEFAULT_MODEL = weights_convert.DEFAULT_MODEL
POOLINGS = ("avg", "max", "gem")
CACHE_ENV = "KERAS_CONVNEXT_CACHE"
CACHE_FORMAT = 1  # bump when the cached model layout changes


# ----------------------------------------------------------------------------
# GeM pooling
# ----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="embedding")
class GeneralizedMeanPooling(keras.layers.Layer):
    """Generalised-mean (GeM) global pooling with a learnable exponent `p`.

    (B, H, W, C) -> (B, C): `mean_{H,W}(max(x, eps) ** p) ** (1 / p)`. p = 1 is
    average pooling of the positive part, p -> inf tends to max pooling. `p`
    is a scalar weight (trainable unless `trainable_p=False`), clamped to at
    least 1 in the forward pass. Computed in float32.
    """

    def __init__(self, p=3.0, eps=1e-6, trainable_p=True, **kwargs):
        super().__init__(**kwargs)
        self.init_p = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)

    def build(self, input_shape):
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.init_p),
            trainable=self.trainable_p,
        )

    def call(self, x):
        x32 = ops.maximum(ops.cast(x, "float32"), self.eps)
        p = ops.maximum(ops.cast(self.p, "float32"), 1.0)
        pooled = ops.mean(ops.power(x32, p), axis=(1, 2))
        return ops.cast(ops.power(pooled, 1.0 / p), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "p": self.init_p,
            "eps": self.eps,
            "trainable_p": self.trainable_p,
        }


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


def input_shape_from_cfg(pretrained_cfg) -> tuple[int, int, int]:
    size = (pretrained_cfg or {}).get("input_size") or (3, 224, 224)
    return (int(size[-2]), int(size[-1]), 3)


def embedding_head(features, *, pooling="avg", head_norm=True, normalize=True, gem_p=3.0):
    """Pool a (B, H, W, C) feature map to (B, C) [+ head LayerNorm] [+ L2 normalisation]."""
    _check_options(pooling, head_norm, normalize)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(features)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="head_pool")(features)
    else:
        x = GeneralizedMeanPooling(p=gem_p, name="head_pool")(features)
    if head_norm:
        x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="head_norm")(x)
    if normalize:
        x = keras.layers.UnitNormalization(axis=-1, name="embedding_l2")(x)
    return x


def embedding_model_from_state(
    state_dict,
    config,
    *,
    pooling="avg",
    head_norm=True,
    normalize=True,
    input_shape=None,
    gem_p=3.0,
) -> keras.Model:
    """Build the embedding model for `config` and port a timm `state_dict` into it."""
    pretrained_cfg = dict(config.get("pretrained_cfg") or {})
    if input_shape is None:
        input_shape = input_shape_from_cfg(pretrained_cfg)
    arch = config.get("architecture", "convnext")

    def build():
        backbone = weights_convert.keras_model_for(
            config, include_top=False, pooling=None, input_shape=tuple(input_shape)
        )
        outputs = embedding_head(
            backbone.output, pooling=pooling, head_norm=head_norm, normalize=normalize, gem_p=gem_p
        )
        return keras.Model(backbone.input, outputs, name=f"{arch}_embedding")

    # fcmae checkpoints have no head norm: like timm, it then stays at weight 1, bias 0
    has_head_norm = any(k.startswith("head.norm.") for k in state_dict)
    skipped = ("head.norm.",) if head_norm and not has_head_norm else ()
    dropped = ("head.fc.",) if head_norm else ("head.fc.", "head.norm.")
    state = {k: v for k, v in state_dict.items() if not k.startswith(dropped)}
    model = weights_convert.build_ported(build, state, skip_prefixes=skipped)
    weights_convert.annotate_model(model, config.get("architecture"), pretrained_cfg)
    return model


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
        elif os.path.exists(os.path.join(os.path.dirname(path), "config.json")):
            files.append(os.path.join(os.path.dirname(path), "config.json"))
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
    `~/.cache/keras-convnext`. Each entry is `<key>.keras` + `<key>.json`
    (architecture, pretrained_cfg), both written atomically. A Hub id whose
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
        with open(os.path.join(self.dir, key + ".json")) as f:
            meta = json.load(f)
        model = keras.saving.load_model(os.path.join(self.dir, key + ".keras"), compile=False)
        weights_convert.annotate_model(
            model, meta.get("architecture"), meta.get("pretrained_cfg") or {}
        )
        return model

    def store(self, source, options, model) -> str | None:
        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            return None
        key = self.key(source, options, fingerprint)
        meta = {
            "source": os.fspath(source),
            "options": options,
            "architecture": model.timm_architecture,
            "pretrained_cfg": model.pretrained_cfg,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        weights_convert.atomic_write(os.path.join(self.dir, key + ".keras"), model.save)

        def write_meta(tmp):
            with open(tmp, "w") as f:
                json.dump(meta, f, indent=1, default=list)

        weights_convert.atomic_write(os.path.join(self.dir, key + ".json"), write_meta)
        if weights_convert.hub_repo_id(os.fspath(source)) is not None:

            def write_alias(tmp):
                with open(tmp, "w") as f:
                    f.write(key)

            weights_convert.atomic_write(self._alias_path(source, options), write_alias)
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
        source: anything `weights_convert.load_timm` takes: a Hub id
            ("timm/convnext_atto.d2_in1k"), a `.safetensors` file, or a folder
            with model.safetensors + config.json.
        pooling: "avg" (timm's), "max", or "gem" (`GeneralizedMeanPooling`,
            learnable p starting at `gem_p`).
        head_norm: apply timm's head LayerNorm after pooling (timm's pre-logits).
        normalize: L2-normalise the output (`keras.layers.UnitNormalization`).
        input_shape: (H, W, 3); default the checkpoint's `pretrained_cfg` input size.
        cache: reuse / store the converted model in the disk cache (`ModelCache`).

    Returns a `keras.Model` (B, H, W, 3) -> (B, D) with `pretrained_cfg` and
    `timm_architecture` attributes; `embedding_dim(model)` gives D (320 for
    convnext_atto).
    """
    _check_options(pooling, head_norm, normalize)
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
    """`model` on up to `batch_size` images, zero-padded to `padded_size`."""
    n = batch.shape[0]
    size = padded_size(n, batch_size)
    if size != n:
        pad = np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, pad], axis=0)
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
