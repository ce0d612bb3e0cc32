"""Fine-tune an embedding model with ArcFace on a folder of identities.

    from embedding.finetune import finetune
    result = finetune("faces/", model="timm/convnext_atto.d2_in1k", epochs=10,
                      output="tuned.keras")
    result.metrics_before.eer, result.metrics_after.eer

    python -m embedding finetune faces/ --model SOURCE --epochs 10 -o tuned.keras

`faces/` holds one folder per identity. Part of the data is held out -- whole
identities by default (open-set: the held-out people are never trained on), or
a share of every identity's images (`holdout_by="image"`, `--holdout-by image`)
-- and the verification metrics of all held-out pairs (cosine similarity,
`embedding.verification_metrics`) are reported before training and after every
epoch. Training: the embedding model (optionally + a Dense projection) feeds an
`ArcFace` layer over the training identities, cross-entropy loss, AdamW with a
cosine learning-rate schedule, optionally the backbone frozen for the first
`freeze_epochs` epochs. The model with the lowest held-out EER (the untouched
input model included) is written to `output` (atomically, plus `<output stem>.config.json`
with its preprocessing and metrics). After every epoch the full training state
(model, ArcFace centres, optimizer) goes to a checkpoint folder; running the same
call again resumes from it. Only the embedding model is saved as the result:
ArcFace is used for training only.

With a `keras.distribution.DataParallel` distribution (JAX backend), or
`distribution="auto"` and more than one local device, every batch is split over
the devices; see the README for several hosts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class _LazyKeras:
    """`keras`, imported on first use: `python -m embedding --help` and `--backend`
    must work before Keras (and a backend) is loaded."""

    def __getattr__(self, name):
        import keras as module

        return getattr(module, name)


keras = _LazyKeras()

PROJECTION_NAME = "embedding_projection"
NORMALIZE_NAME = "embedding_l2"
CHECKPOINT_MODEL = "train.keras"
CHECKPOINT_STATE = "state.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


class ImageSet:
    """Images with identity labels, loaded on demand: `load(indices)` -> (n, H, W, 3) float32.

    `ImageSet.from_arrays(x, y)`: preprocessed images in memory.
    `ImageSet.from_folder(root, preprocess)`: one sub-folder per identity.
    """

    def __init__(self, identities, loader, names=None):
        self.identities = np.asarray(identities)
        self._loader = loader
        self.names = names

    def __len__(self):
        return len(self.identities)

    def load(self, indices) -> np.ndarray:
        return np.asarray(self._loader(np.asarray(indices, dtype=np.int64)), dtype=np.float32)

    @classmethod
    def from_arrays(cls, images, labels):
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected images (N, H, W, C) and labels (N,), got {images.shape} and "
                f"{labels.shape}."
            )
        return cls(labels, lambda idx: images[idx])

    @classmethod
    def from_folder(cls, root, preprocess, workers: int | None = None):
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder")
        paths, identities = [], []
        for identity in sorted(os.listdir(root)):
            folder = os.path.join(root, identity)
            if not os.path.isdir(folder):
                continue
            for sub, dirs, files in os.walk(folder):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(sub, name))
                        identities.append(identity)
        if not paths:
            raise ValueError(f"{root}: no images in identity sub-folders")
        pool = ThreadPoolExecutor(workers or min(4, os.cpu_count() or 1))

        def load(idx):
            return np.stack(list(pool.map(lambda i: preprocess(paths[i]), idx)))

        names = [os.path.relpath(p, root) for p in paths]
        return cls(identities, load, names)


def split_holdout(identities, holdout=0.2, by="identity", seed=0):
    """(train indices, held-out indices), seeded.

    by="identity": round(holdout * identities) whole identities (at least 2) are
    held out (open-set). by="image": round(holdout * n) images of each identity
    with n >= 2 images (at least 1, never all of them) are held out.
    """
    identities = np.asarray(identities)
    n = len(identities)
    if holdout <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if not 0 < holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}.")
    rng = np.random.default_rng(seed)
    names = np.unique(identities)
    held = np.zeros(n, dtype=bool)
    if by == "identity":
        if len(names) < 3:
            raise ValueError(
                f"Holding out whole identities needs at least 3 identities, found {len(names)}; "
                "use holdout_by='image'."
            )
        count = min(max(2, round(holdout * len(names))), len(names) - 1)
        chosen = rng.choice(names, size=count, replace=False)
        held[np.isin(identities, chosen)] = True
    elif by == "image":
        for name in names:
            idx = np.flatnonzero(identities == name)
            if len(idx) < 2:
                continue
            count = min(max(1, round(holdout * len(idx))), len(idx) - 1)
            held[rng.choice(idx, size=count, replace=False)] = True
    else:
        raise ValueError(f"holdout_by must be 'identity' or 'image', got {by!r}.")
    return np.flatnonzero(~held), np.flatnonzero(held)


def verification_pairs(identities, max_pairs=200_000, seed=0):
    """(i, j, same) for the pairs of a labelled set: all of them, or a sample of
    `max_pairs` (all genuine pairs up to half of it, the rest impostors)."""
    identities = np.asarray(identities)
    n = len(identities)
    if n * (n - 1) // 2 <= max_pairs:
        i, j = np.triu_indices(n, 1)
    else:
        rng = np.random.default_rng(seed)
        gi, gj = [], []
        for name in np.unique(identities):
            idx = np.flatnonzero(identities == name)
            a, b = np.triu_indices(len(idx), 1)
            gi.append(idx[a])
            gj.append(idx[b])
        gi, gj = np.concatenate(gi), np.concatenate(gj)
        if len(gi) > max_pairs // 2:
            keep = rng.choice(len(gi), max_pairs // 2, replace=False)
            gi, gj = gi[keep], gj[keep]
        need = max_pairs - len(gi)
        ii = rng.integers(0, n, size=2 * need)
        jj = rng.integers(0, n, size=2 * need)
        ok = identities[ii] != identities[jj]
        i = np.concatenate([gi, ii[ok][:need]])
        j = np.concatenate([gj, jj[ok][:need]])
    return i, j, identities[i] == identities[j]


def _augment(batch, rng, hflip, shift):
    """Random horizontal flips and translations (reflect padding) of a batch."""
    out = batch.copy()
    if hflip:
        flip = rng.random(len(out)) < 0.5
        out[flip] = out[flip, :, ::-1]
    if shift > 0:
        h, w = out.shape[1:3]
        padded = np.pad(out, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
        dy = rng.integers(0, 2 * shift + 1, size=len(out))
        dx = rng.integers(0, 2 * shift + 1, size=len(out))
        for k in range(len(out)):
            out[k] = padded[k, dy[k] : dy[k] + h, dx[k] : dx[k] + w]
    return out


_CLASSES = {}


def _train_batches_class():
    """`TrainBatches`, defined on first use (it subclasses `keras.utils.PyDataset`)."""
    if "TrainBatches" in _CLASSES:
        return _CLASSES["TrainBatches"]
    import keras as keras_module

    class TrainBatches(keras_module.utils.PyDataset):
        """Shuffled full batches ((images, class ids), class ids); epoch `e` uses seed (seed, e).

        With several processes (multi-host JAX), each yields its 1/process_count
        share of every global batch.
        """

        def __init__(
            self,
            images: ImageSet,
            indices,
            class_ids,
            batch_size,
            *,
            seed=0,
            augment=True,
            hflip=True,
            shift=None,
            process_index=0,
            process_count=1,
        ):
            super().__init__(workers=1, use_multiprocessing=False)
            self.images = images
            self.indices = np.asarray(indices)
            self.class_ids = np.asarray(class_ids)
            self.batch_size = int(batch_size)
            self.seed = seed
            self.augment = augment
            self.hflip = hflip
            self.shift = shift
            self.process_index = process_index
            self.process_count = process_count
            self.set_epoch(0)

        def set_epoch(self, epoch):
            self.epoch = int(epoch)
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(
                len(self.indices)
            )

        def __len__(self):
            return max(1, len(self.indices) // self.batch_size)

        def __getitem__(self, step):
            picks = self._order[step * self.batch_size : (step + 1) * self.batch_size]
            picks = picks[self.process_index :: self.process_count]
            x = self.images.load(self.indices[picks])
            y = self.class_ids[picks].astype("int32")
            if self.augment:
                rng = np.random.default_rng([self.seed, self.epoch, step, self.process_index])
                shift = self.shift if self.shift is not None else max(1, x.shape[1] // 16)
                x = _augment(x, rng, self.hflip, shift)
            return (x, y), y

    _CLASSES["TrainBatches"] = TrainBatches
    return TrainBatches


def __getattr__(name):
    if name == "TrainBatches":
        return _train_batches_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def as_embedding_model(model: keras.Model, embedding_dim: int | None = None) -> keras.Model:
    """(B, H, W, 3) -> L2-normalised (B, D).

    A feature-map output is average-pooled; an output that is not yet
    L2-normalised gets `UnitNormalization`; `embedding_dim` inserts a Dense
    projection (named "embedding_projection") before the normalisation.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    last = model.layers[-1]
    normalized = isinstance(last, keras.layers.UnitNormalization)
    if len(model.output_shape) == 2 and normalized and embedding_dim is None:
        return model
    features = last.input if normalized else model.output
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="embedding_pool")(features)
    elif len(features.shape) != 2:
        raise ValueError(f"Cannot make embeddings from an output of shape {features.shape}.")
    if embedding_dim is not None:
        features = keras.layers.Dense(int(embedding_dim), name=PROJECTION_NAME)(features)
    out = keras.layers.UnitNormalization(axis=-1, name=NORMALIZE_NAME)(features)
    result = keras.Model(model.input, out, name=model.name)
    if cfg is not None:
        result.pretrained_cfg = dict(cfg)
    return result


def build_training_model(
    embedding_model: keras.Model, num_classes: int, scale=30.0, margin=0.35, easy_margin=False
) -> keras.Model:
    """[images, class ids] -> ArcFace logits, with `embedding_model` nested inside."""
    from embedding.arcface import ArcFace

    image = keras.Input(shape=embedding_model.input_shape[1:], name="image")
    label = keras.Input(shape=(), dtype="int32", name="label")
    embeddings = embedding_model(image)
    logits = ArcFace(
        num_classes, scale=scale, margin=margin, easy_margin=easy_margin, name="arcface"
    )([embeddings, label])
    return keras.Model([image, label], logits, name="arcface_training")


def embedding_model_of(training_model: keras.Model) -> keras.Model:
    """The nested embedding model of a `build_training_model` model."""
    for layer in training_model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError("No nested embedding model found.")


def set_backbone_trainable(embedding_model: keras.Model, trainable: bool) -> None:
    """Freeze / unfreeze everything but the projection (ArcFace always trains)."""
    for layer in embedding_model.layers:
        layer.trainable = True if layer.name == PROJECTION_NAME else trainable


def save_model(model: keras.Model, path, meta: dict | None = None) -> None:
    """Atomically write `model` to `path` (.keras) and, beside it, the sidecar config
    (`weights_convert.sidecar_path`: pretrained_cfg, architecture, `meta`)."""
    import weights_convert

    weights_convert.save_converted(model, path, extra=meta)


def load_model(path) -> keras.Model:
    """A model written by `save_model` / `finetune`, with its `pretrained_cfg` attribute."""
    import weights_convert

    return weights_convert.load_converted(path)


def _write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


# ----------------------------------------------------------------------------
# Distribution
# ----------------------------------------------------------------------------


def resolve_distribution(distribution="auto"):
    """None, a `keras.distribution.Distribution`, or "auto": `DataParallel` over all
    devices when the JAX backend sees more than one, else None."""
    if distribution is None or hasattr(distribution, "device_mesh"):
        return distribution
    if distribution != "auto":
        raise ValueError(
            f"distribution must be None, 'auto' or a Distribution, got {distribution!r}"
        )
    if keras.backend.backend() != "jax":
        return None
    devices = keras.distribution.list_devices()
    if len(devices) < 2:
        return None
    return keras.distribution.DataParallel(devices=devices)


def _device_count(distribution) -> int:
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))


def _process_info(distribution):
    if distribution is None or keras.backend.backend() != "jax":
        return 0, 1
    import jax

    return jax.process_index(), jax.process_count()


def embed_images(model: keras.Model, images: ImageSet, indices, batch_size=64, chunk=16):
    """Embeddings (n, D) float32 of `images[indices]`, in batches of exactly
    `batch_size` (the last padded), so that a DataParallel distribution (in
    effect while this runs) can split every batch and only one shape compiles."""
    indices = np.asarray(indices)
    out = []
    step = batch_size * chunk
    for start in range(0, len(indices), step):
        x = images.load(indices[start : start + step])
        n = len(x)
        padded = -(-n // batch_size) * batch_size
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
        y = model.predict(x, batch_size=batch_size, verbose=0)
        out.append(np.asarray(keras.ops.convert_to_numpy(y), dtype=np.float32)[:n])
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def evaluate(model, images: ImageSet, indices, batch_size=64, max_pairs=200_000, seed=0):
    """`embedding.verification_metrics` of all (or `max_pairs` sampled) pairs of
    `images[indices]`, scored by cosine similarity."""
    from embedding.metrics import verification_metrics

    emb = embed_images(model, images, indices, batch_size)
    i, j, same = verification_pairs(images.identities[indices], max_pairs, seed)
    scores = np.sum(emb[i] * emb[j], axis=1)
    return verification_metrics(scores, same, folds=None)


# ----------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    model: keras.Model  # the best embedding model (lowest held-out EER)
    metrics_before: object  # embedding.VerificationMetrics, None without a held-out set
    metrics_after: object  # of `model`
    best_epoch: int  # 0: the untouched input model was best
    history: list = field(default_factory=list)  # one dict per epoch
    output: str | None = None


def _load_source(model, *, input_shape, pooling, head_norm, cache, cache_dir, distribution):
    if isinstance(model, keras.Model):
        if distribution is None:
            return model
        # variables must be created under the distribution: rebuild and copy
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        if hasattr(model, "pretrained_cfg"):
            clone.pretrained_cfg = dict(model.pretrained_cfg)
        return clone
    source = os.fspath(model)
    if source.endswith(".keras"):
        return load_model(source)
    from embedding.model import build_model

    return build_model(
        source,
        pooling=pooling,
        head_norm=head_norm,
        input_shape=input_shape,
        cache=cache,
        cache_dir=cache_dir,
    )


def _phase_optimizer(lr, weight_decay, steps, warmup_steps, cosine):
    if cosine:
        warmup_steps = min(warmup_steps, max(steps - 1, 0))
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup_steps else lr,
            decay_steps=max(1, steps - warmup_steps),
            alpha=0.01,
            warmup_target=lr if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    else:
        schedule = lr
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    _exclude_from_decay(optimizer)
    return optimizer


def _exclude_from_decay(optimizer):
    # biases, norm scales/offsets and the (normalised) ArcFace centres; not
    # part of the optimizer's config, so re-applied after loading a checkpoint
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "centers"])


def _fingerprint(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, default=_json_default).encode()).hexdigest()[:16]


def _say(verbose, text):
    if verbose:
        print(text, flush=True)


def finetune(
    data,
    model,
    *,
    output=None,
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int | None = None,
    freeze_epochs: int = 0,
    holdout: float = 0.2,
    holdout_by: str = "identity",
    embedding_dim: int | None = None,
    scale: float = 30.0,
    margin: float = 0.35,
    easy_margin: bool = False,
    augment: bool = True,
    hflip: bool = True,
    image_size: int | None = None,
    pooling: str = "avg",
    head_norm: bool = True,
    cache: bool = True,
    cache_dir=None,
    checkpoint_dir=None,
    resume: bool = True,
    keep_checkpoint: bool = False,
    distribution="auto",
    eval_batch_size: int | None = None,
    max_pairs: int = 200_000,
    seed: int = 0,
    verbose: int = 1,
) -> FinetuneResult:
    """Fine-tune `model` on `data` with ArcFace; see the module docstring.

    Args:
        data: a folder with one sub-folder of images per identity, an `ImageSet`,
            or a tuple (images (N, H, W, 3) preprocessed float32, labels (N,)).
        model: a `keras.Model` (embedding model, backbone or feature extractor),
            a `.keras` file, or a checkpoint source for `embedding.build_model`
            (Hub id, folder, .safetensors).
        output: where to write the best embedding model (.keras), or None.
        epochs: total epochs, warm-up epochs included.
        batch_size: global batch size (split over devices and processes).
        learning_rate, weight_decay: AdamW; the rate follows a cosine schedule
            (after `warmup_steps` linear warm-up, default 5% of the steps) from
            the first unfrozen epoch to the end.
        freeze_epochs: epochs at the start that train only the ArcFace centres
            (and the projection), at a constant `learning_rate`.
        holdout, holdout_by: share held out for verification, by "identity"
            (open-set, default) or "image" (a share of every identity).
        embedding_dim: add a Dense projection to this size before the L2 norm.
        scale, margin, easy_margin: the `ArcFace` settings (s=30, m=0.35).
        augment, hflip: random translations (1/16 of the side) and flips.
        image_size: input side for checkpoint sources (default: the
            checkpoint's own); folder images are resized to the model input.
        pooling, head_norm, cache, cache_dir: passed to `build_model`.
        checkpoint_dir: training state after every epoch (default
            `<output>.ckpt`, or none without `output`); `resume` continues from
            it; removed at the end unless `keep_checkpoint`.
        distribution: "auto" (DataParallel over all devices on JAX with more
            than one), None, or a `keras.distribution.Distribution`.
        max_pairs: cap on the held-out pairs scored (all pairs below it).
        seed: split, shuffling, augmentation and initialisation.
        verbose: 0 silent, 1 progress bars and a line per epoch, 2 lines only.
    """
    import weights_convert

    if epochs < 1 or not 0 <= freeze_epochs <= epochs:
        raise ValueError(
            f"Need epochs >= 1 and 0 <= freeze_epochs <= epochs; got {epochs}, {freeze_epochs}."
        )
    distribution = resolve_distribution(distribution)
    devices = _device_count(distribution)
    process_index, process_count = _process_info(distribution)
    is_chief = process_index == 0
    if batch_size % (devices * process_count) and devices > 1:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the {devices} devices "
            "in the distribution."
        )
    eval_batch_size = eval_batch_size or max(batch_size, 2 * devices)
    eval_batch_size = -(-eval_batch_size // devices) * devices
    if checkpoint_dir is None and output is not None:
        checkpoint_dir = os.fspath(output) + ".ckpt"
    scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
    keras.utils.set_random_seed(seed)
    with scope:
        input_shape = (image_size, image_size, 3) if image_size else None
        base = _load_source(
            model,
            input_shape=input_shape,
            pooling=pooling,
            head_norm=head_norm,
            cache=cache,
            cache_dir=cache_dir,
            distribution=distribution,
        )
        embedding_model = as_embedding_model(base, embedding_dim)
        cfg = dict(getattr(base, "pretrained_cfg", None) or {})
        height, width = embedding_model.input_shape[1:3]
        if height is not None and width is not None:
            cfg["input_size"] = [3, int(height), int(width)]
        embedding_model.pretrained_cfg = cfg

        if isinstance(data, ImageSet):
            images = data
        elif isinstance(data, (tuple, list)):
            images = ImageSet.from_arrays(*data)
        else:
            from embedding.preprocess import Preprocessor

            images = ImageSet.from_folder(data, Preprocessor(cfg))

        train_idx, held_idx = split_holdout(images.identities, holdout, holdout_by, seed)
        classes = sorted(set(images.identities[train_idx].tolist()))
        class_of = {name: k for k, name in enumerate(classes)}
        class_ids = np.array([class_of.get(name, -1) for name in images.identities.tolist()])
        if len(classes) < 2:
            raise ValueError("Need at least 2 training identities.")
        per_process = batch_size // process_count
        batches = _train_batches_class()(
            images,
            train_idx,
            class_ids[train_idx],
            per_process,
            seed=seed,
            augment=augment,
            hflip=hflip,
            process_index=process_index,
            process_count=process_count,
        )
        steps_per_epoch = len(batches)
        tuned_steps = (epochs - freeze_epochs) * steps_per_epoch
        if warmup_steps is None:
            warmup_steps = int(0.05 * tuned_steps)
        run_id = _fingerprint(
            len(images),
            held_idx,
            classes,
            [epochs, batch_size, learning_rate, weight_decay, warmup_steps, freeze_epochs],
            [embedding_dim, scale, margin, easy_margin, seed, holdout, holdout_by],
        )

        def evaluate_now(m):
            if len(held_idx) == 0:
                return None
            return evaluate(m, images, held_idx, eval_batch_size, max_pairs, seed)

        def compile_phase(train_model, phase):
            frozen = phase == "frozen"
            set_backbone_trainable(embedding_model_of(train_model), not frozen)
            optimizer = _phase_optimizer(
                learning_rate,
                weight_decay,
                freeze_epochs * steps_per_epoch if frozen else tuned_steps,
                0 if frozen else warmup_steps,
                cosine=not frozen,
            )
            train_model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
            )

        state = None
        model_path = state_path = None
        if checkpoint_dir is not None:
            model_path = os.path.join(checkpoint_dir, CHECKPOINT_MODEL)
            state_path = os.path.join(checkpoint_dir, CHECKPOINT_STATE)
            if resume and os.path.exists(state_path) and os.path.exists(model_path):
                with open(state_path) as f:
                    state = json.load(f)
                if state.get("run_id") != run_id:
                    raise ValueError(
                        f"Checkpoint {checkpoint_dir} is from a different run (data, split or "
                        "settings changed); pass resume=False (--no-resume) or another "
                        "checkpoint folder."
                    )

        from embedding.metrics import VerificationMetrics

        def metrics_from(d):
            if d is None:
                return None
            d = dict(d)
            for key in ("tar_at_far", "threshold_at_far"):
                d[key] = {float(k): v for k, v in d[key].items()}
            return VerificationMetrics(**d)

        if state is not None:
            train_model = keras.saving.load_model(model_path)
            _exclude_from_decay(train_model.optimizer)
            embedding_model_trained = embedding_model_of(train_model)
            embedding_model_trained.pretrained_cfg = cfg
            start_epoch = state["epoch"]
            phase = state["phase"]
            history = state["history"]
            best_eer, best_epoch = state["best_eer"], state["best_epoch"]
            metrics_before = metrics_from(state["metrics_before"])
            best_metrics = metrics_from(state["best_metrics"])
            _say(verbose, f"Resuming from {checkpoint_dir} after epoch {start_epoch}/{epochs}.")
            embedding_model = embedding_model_trained
        else:
            train_model = build_training_model(
                embedding_model, len(classes), scale=scale, margin=margin, easy_margin=easy_margin
            )
            # centres from numpy, seeded: the same start on any device layout
            centers = train_model.get_layer("arcface").centers
            fan = sum(centers.shape)
            centers.assign(
                np.random.default_rng(seed).uniform(-1, 1, centers.shape).astype("float32")
                * np.float32(math.sqrt(6.0 / fan))
            )
            start_epoch, phase, history = 0, None, []
            _say(
                verbose,
                f"{len(train_idx)} training images of {len(classes)} identities, "
                f"{len(held_idx)} held out ({holdout_by}); {steps_per_epoch} steps per epoch"
                + (f" on {devices} devices" if devices > 1 else ""),
            )
            metrics_before = evaluate_now(embedding_model)
            best_metrics = metrics_before
            best_eer = metrics_before.eer if metrics_before is not None else math.inf
            best_epoch = 0
            if metrics_before is not None:
                _say(verbose, f"held-out before: EER {metrics_before.eer:.4f}")
                if output is not None and is_chief:
                    save_model(embedding_model, output, _meta(0, metrics_before, metrics_before))

        for epoch in range(start_epoch, epochs):
            wanted = "frozen" if epoch < freeze_epochs else "tuned"
            if wanted != phase:
                compile_phase(train_model, wanted)
                phase = wanted
            batches.set_epoch(epoch)
            started = time.time()
            fit = train_model.fit(
                batches,
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,  # TrainBatches shuffles, seeded by epoch (resumable)
                verbose=verbose if verbose in (0, 1, 2) else "auto",
            )
            record = {k: float(v[-1]) for k, v in fit.history.items()}
            record.update(epoch=epoch + 1, phase=phase, seconds=round(time.time() - started, 2))
            metrics = evaluate_now(embedding_model)
            if metrics is not None:
                record["heldout_eer"] = metrics.eer
            improved = metrics is None or metrics.eer < best_eer
            if improved:
                best_eer = metrics.eer if metrics is not None else math.inf
                best_epoch, best_metrics = epoch + 1, metrics
                if output is not None and is_chief:
                    save_model(embedding_model, output, _meta(epoch + 1, metrics_before, metrics))
            history.append(record)
            _say(
                verbose,
                f"epoch {epoch + 1}/{epochs} ({phase}): loss {record.get('loss', float('nan')):.4f}"
                + (f", held-out EER {metrics.eer:.4f}" if metrics is not None else "")
                + (
                    " (best, saved)"
                    if improved and output
                    else f" (best {best_eer:.4f} @ {best_epoch})"
                ),
            )
            if checkpoint_dir is not None and is_chief:
                weights_convert.atomic_write(model_path, train_model.save)
                state = {
                    "run_id": run_id,
                    "epoch": epoch + 1,
                    "phase": phase,
                    "history": history,
                    "best_eer": best_eer,
                    "best_epoch": best_epoch,
                    "metrics_before": _metrics_dict(metrics_before),
                    "best_metrics": _metrics_dict(best_metrics),
                }
                weights_convert.atomic_write(state_path, lambda tmp, s=state: _write_json(tmp, s))

        if output is not None:
            best_model = load_model(output) if is_chief else embedding_model
            if distribution is not None:
                best_model = _load_source(
                    best_model,
                    input_shape=None,
                    pooling=pooling,
                    head_norm=head_norm,
                    cache=cache,
                    cache_dir=cache_dir,
                    distribution=distribution,
                )
                best_model.pretrained_cfg = cfg
        else:
            best_model = embedding_model
        if checkpoint_dir is not None and not keep_checkpoint and is_chief:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if best_metrics is not None and metrics_before is not None:
        _say(
            verbose,
            f"held-out EER: {metrics_before.eer:.4f} before, {best_metrics.eer:.4f} after "
            f"(epoch {best_epoch})" + (f"; wrote {output}" if output else ""),
        )
    return FinetuneResult(
        model=best_model,
        metrics_before=metrics_before,
        metrics_after=best_metrics,
        best_epoch=best_epoch,
        history=history,
        output=os.fspath(output) if output is not None else None,
    )


def _metrics_dict(metrics):
    if metrics is None:
        return None
    out = metrics.to_dict()
    out.pop("kfold", None)
    return json.loads(json.dumps(out, default=_json_default))


def _meta(epoch, before, after):
    return {
        "epoch": epoch,
        "heldout_eer_before": None if before is None else before.eer,
        "heldout_eer": None if after is None else after.eer,
    }


# ----------------------------------------------------------------------------
# Command line: python -m embedding finetune DATA_DIR --model SOURCE -o tuned.keras
# ----------------------------------------------------------------------------


def add_finetune_parser(subparsers):
    from embedding.cli import add_model_options

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune with ArcFace on a folder of identities",
        description="Fine-tune an embedding model with ArcFace on DATA_DIR (one folder per "
        "identity), report held-out verification metrics before and after, and write the "
        "model with the best held-out EER. Rerun the same command to resume after an "
        "interruption.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR")
    p.add_argument("-o", "--output", required=True, help="output .keras (best held-out EER)")
    add_model_options(p)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--freeze-epochs", type=int, default=0, help="warm-up epochs, backbone frozen")
    t.add_argument("--holdout", type=float, default=0.2, help="share held out (default 0.2)")
    t.add_argument(
        "--holdout-by",
        choices=("identity", "image"),
        default="identity",
        help="hold out whole identities (open-set, default) or a share of each one's images",
    )
    t.add_argument("--embedding-dim", type=int, default=None, help="add a Dense projection")
    t.add_argument("--scale", type=float, default=30.0, help="ArcFace s (default 30)")
    t.add_argument("--margin", type=float, default=0.35, help="ArcFace m in radians (0.35)")
    t.add_argument("--easy-margin", action="store_true")
    t.add_argument("--image-size", type=int, default=None, help="input side (default: model's)")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    t.add_argument("--checkpoint-dir", default=None, help="default OUTPUT.ckpt")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--keep-checkpoint", action="store_true")
    t.add_argument(
        "--distribute",
        choices=("auto", "none"),
        default="auto",
        help="auto: data-parallel over all local devices (JAX, >1 device)",
    )
    t.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_finetune)


def run_finetune(args):
    from embedding.cli import CommandError

    if not os.path.isdir(args.data_dir):
        raise CommandError(f"{args.data_dir}: no such folder")
    if not args.model:
        from embedding.model import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    try:
        result = finetune(
            args.data_dir,
            args.model,
            output=args.output,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            weight_decay=args.weight_decay,
            freeze_epochs=args.freeze_epochs,
            holdout=args.holdout,
            holdout_by=args.holdout_by,
            embedding_dim=args.embedding_dim,
            scale=args.scale,
            margin=args.margin,
            easy_margin=args.easy_margin,
            augment=not args.no_augment,
            hflip=not args.no_flip,
            image_size=args.image_size,
            pooling=args.pooling,
            head_norm=not args.no_head_norm,
            cache=not args.no_cache,
            cache_dir=args.cache_dir,
            checkpoint_dir=args.checkpoint_dir,
            resume=not args.no_resume,
            keep_checkpoint=args.keep_checkpoint,
            distribution="auto" if args.distribute == "auto" else None,
            seed=args.seed,
            verbose=2 if args.no_progress else 1,
        )
    except KeyboardInterrupt:
        ckpt = args.checkpoint_dir or args.output + ".ckpt"
        print(f"\ninterrupted; run the same command again to resume from {ckpt}", file=sys.stderr)
        return 130
    except ValueError as error:
        raise CommandError(str(error)) from error
    if result.metrics_before is not None:
        print("held-out before:\n  " + result.metrics_before.summary().replace("\n", "\n  "))
        print(f"held-out after (epoch {result.best_epoch}):")
        print("  " + result.metrics_after.summary().replace("\n", "\n  "))
    print(f"wrote {args.output}")
    return 0
