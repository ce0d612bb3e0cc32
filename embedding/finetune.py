"""Fine-tune an embedding model with ArcFace on a folder of identities.

    from embedding.finetune import finetune
    result = finetune("faces/", model="timm/convnext_atto.d2_in1k", epochs=10,
                      output="tuned.keras")
    result.metrics_before.eer, result.metrics_after.eer

    python -m embedding finetune faces/ --model SOURCE --epochs 10 -o tuned.keras

`faces/` holds one folder per identity (`embedding.files`: an image's label is
the top-level folder it lies in; images directly in `faces/` are left out).
Every image is decoded once before training: unreadable ones are skipped and
reported, not found an hour into the run. Part of the data is held out --
whole identities by default (open-set: the held-out people are never trained
on), or a share of every identity's images (`holdout_by="image"`,
`--holdout-by image`) -- and the verification metrics of all held-out pairs
(cosine similarity, `embedding.verification_metrics`) are reported before
training and after every epoch. Training: the embedding model (optionally + a
Dense projection) feeds an `ArcFace` layer over the training identities,
cross-entropy loss, AdamW with a cosine learning-rate schedule, optionally the
backbone frozen for the first `freeze_epochs` epochs. The model with the
lowest held-out EER (the untouched input model included) is written to
`output` (atomically, plus `<output stem>.config.json` with its preprocessing
and metrics).

The run's settings are one `FinetuneConfig`. After every epoch the full
training state (model, ArcFace centres, optimizer) and the run's settings, data
listing and model fingerprint go to a checkpoint folder; the same call in a
new process resumes from it, and a call that differs in any of them is refused
with the names of what differs. Only the embedding model is saved as the
result: ArcFace is used for training only.

With a `keras.distribution.DataParallel` distribution (JAX backend), or
`distribution="auto"` and more than one local device, every batch is split over
the devices; see the README for several hosts.

The command line is `embedding.finetune_cli`; this module does not import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import keras
import numpy as np

import convnext_layers  # noqa: F401  (registers the ConvNeXt layers a checkpoint may hold)
import weights_convert
from embedding import model as embedding_model_module
from embedding.arcface import ArcFace
from embedding.errors import (
    FinetuneConfigError,
    FinetuneDataError,
    ImageLoadError,
    InputError,
    ModelSourceError,
    ResumeMismatchError,
    without_traceback,
)
from embedding.files import check_output_path, identity_folders
from embedding.model import PROJECTION_NAME, as_embedding_model
from embedding.preprocess import DEFAULT_MAX_PIXELS, Preprocessor

CHECKPOINT_MODEL = "train.keras"
CHECKPOINT_STATE = "state.json"
STATE_FORMAT = 2  # bump when state.json changes meaning
# preprocessed folder images up to this size stay in memory (decoded once for the check anyway)
IMAGE_CACHE_BYTES = 1 << 30


def checkpoint_custom_objects() -> dict:
    """Every class a training checkpoint or a fine-tuned model may hold, by name.

    Importing this module imports every module that registers such a class
    (the imports above: the ConvNeXt layers, GeM pooling, ArcFace), so any
    load done through it finds them; loads also pass them explicitly, so a
    checkpoint never depends on what else the process happened to import.
    """
    return {
        name.split(">", 1)[-1]: obj
        for name, obj in keras.saving.get_custom_objects().items()
        if getattr(obj, "__module__", "").startswith(("convnext_layers", "embedding."))
    }


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------

HOLDOUT_BY = ("identity", "image")


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting that changes a fine-tuning run (and so its resume key).

    Attributes:
        epochs: total epochs, warm-up epochs included.
        batch_size: global batch size (split over devices and processes).
        learning_rate, weight_decay: AdamW; the rate follows a cosine schedule
            (after `warmup_steps` linear warm-up, default 5% of the steps) from
            the first unfrozen epoch to the end.
        freeze_epochs: epochs at the start that train only the ArcFace centres
            (and the projection), at a constant `learning_rate`.
        holdout, holdout_by: share held out for verification, by "identity"
            (open-set, default) or "image" (a share of every identity); 0: none.
        embedding_dim: add a Dense projection to this size before the L2 norm.
        scale, margin, easy_margin: the `ArcFace` settings (s=30, m=0.35).
        augment, hflip: random translations (1/16 of the side) and flips.
        image_size: input side for checkpoint sources (default: the
            checkpoint's own); folder images are resized to the model input.
        pooling, head_norm: passed to `build_model` for checkpoint sources.
        max_pairs: cap on the held-out pairs scored (all pairs below it).
        seed: split, shuffling, augmentation and initialisation.
    """

    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    freeze_epochs: int = 0
    holdout: float = 0.2
    holdout_by: str = "identity"
    embedding_dim: int | None = None
    scale: float = 30.0
    margin: float = 0.35
    easy_margin: bool = False
    augment: bool = True
    hflip: bool = True
    image_size: int | None = None
    pooling: str = "avg"
    head_norm: bool = True
    max_pairs: int = 200_000
    seed: int = 0

    def __post_init__(self):
        def whole(name, low, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise FinetuneConfigError(f"{name} must be a whole number, got {value!r}.")
            if value < low:
                raise FinetuneConfigError(f"{name} must be at least {low}, got {value}.")

        def number(name, low, high=math.inf, low_open=False):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise FinetuneConfigError(f"{name} must be a number, got {value!r}.")
            value = float(value)
            if (
                not math.isfinite(value)
                or value < low
                or value >= high
                or (low_open and value == low)
            ):
                interval = f"{'(' if low_open else '['}{low:g}, {high:g})"
                raise FinetuneConfigError(f"{name} must lie in {interval}, got {value!r}.")

        whole("epochs", 1)
        whole("batch_size", 1)
        whole("freeze_epochs", 0)
        whole("warmup_steps", 0, optional=True)
        whole("embedding_dim", 1, optional=True)
        whole("image_size", 16, optional=True)
        whole("max_pairs", 2)
        whole("seed", 0)
        if self.freeze_epochs > self.epochs:
            raise FinetuneConfigError(
                f"freeze_epochs ({self.freeze_epochs}) cannot exceed epochs ({self.epochs})."
            )
        number("learning_rate", 0.0, low_open=True)
        number("weight_decay", 0.0)
        number("holdout", 0.0, 1.0)
        number("scale", 0.0, low_open=True)
        number("margin", 0.0, math.pi / 2)
        if self.holdout_by not in HOLDOUT_BY:
            raise FinetuneConfigError(
                f"holdout_by must be 'identity' or 'image', got {self.holdout_by!r}."
            )
        if self.pooling not in embedding_model_module.POOLINGS:
            raise FinetuneConfigError(
                f"pooling must be one of {', '.join(embedding_model_module.POOLINGS)}, "
                f"got {self.pooling!r}."
            )
        for name in ("easy_margin", "augment", "hflip", "head_norm"):
            if not isinstance(getattr(self, name), bool):
                raise FinetuneConfigError(f"{name} must be True or False.")

    def replace(self, **changes) -> FinetuneConfig:
        """A copy with `changes`; an unknown name is a `TypeError` listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"Unknown fine-tuning setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(sorted(names))}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


class ImageSet:
    """Images with identity labels, loaded on demand: `load(indices)` -> (n, H, W, 3) float32.

    `ImageSet.from_arrays(x, y)`: preprocessed images in memory.
    `ImageSet.from_folder(root, preprocess)`: one sub-folder per identity.
    `fingerprint` identifies the content (for the resume check), `skipped`
    lists the unreadable images left out, `loose` the images outside any
    identity folder.
    """

    def __init__(self, identities, loader, names=None, fingerprint=None):
        self.identities = np.asarray(identities)
        self._loader = loader
        self.names = names
        self.fingerprint = fingerprint
        self.skipped: list[ImageLoadError] = []
        self.loose: list[str] = []

    def __len__(self):
        return len(self.identities)

    def load(self, indices) -> np.ndarray:
        return np.asarray(self._loader(np.asarray(indices, dtype=np.int64)), dtype=np.float32)

    @classmethod
    def from_arrays(cls, images, labels):
        images = np.asarray(images, dtype=np.float32)
        labels = np.asarray(labels)
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise FinetuneDataError(
                f"Expected images (N, H, W, C) and labels (N,), got {images.shape} and "
                f"{labels.shape}."
            )
        if not np.all(np.isfinite(images)):
            raise FinetuneDataError("The images contain NaN or infinity.")
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
        digest.update(json.dumps(labels.tolist(), default=str).encode())
        return cls(labels, lambda idx: images[idx], fingerprint=digest.hexdigest()[:20])

    @classmethod
    def from_folder(
        cls,
        root,
        preprocess: Preprocessor,
        workers: int | None = None,
        cache_bytes: int = IMAGE_CACHE_BYTES,
    ):
        """The images in identity sub-folders of `root`, each decoded once now.

        Unreadable images are left out (listed in `skipped`); preprocessed
        images are kept in memory as uint8 while they fit in `cache_bytes`.
        Raises `FinetuneDataError` when no image can be read.
        """
        root = os.fspath(root)
        files, loose = identity_folders(root)
        workers = workers or min(4, os.cpu_count() or 1)

        def prepare(path):
            try:  # resize + crop; normalised when loaded (exactly what preprocess() gives)
                return preprocess.resize_crop(preprocess.load(path))
            except ImageLoadError as error:
                return without_traceback(error)

        kept, skipped, cache, cached_bytes = [], [], [], 0
        chunk = 64 * workers  # decoded ahead, bounded
        with ThreadPoolExecutor(workers, thread_name_prefix="finetune-io") as pool:
            for start in range(0, len(files), chunk):
                part = files[start : start + chunk]
                for image_file, value in zip(
                    part, pool.map(prepare, [f.path for f in part]), strict=True
                ):
                    if isinstance(value, ImageLoadError):
                        skipped.append(value)
                        continue
                    kept.append(image_file)
                    if cache is not None:
                        cached_bytes += value.nbytes
                        if cached_bytes <= cache_bytes:
                            cache.append(value)
                        else:  # too large to keep: load from disk every epoch
                            cache = None
        if not kept:
            raise FinetuneDataError(
                f"{root}: none of the {len(files)} images could be read (first: {skipped[0]})"
            )
        paths = [f.path for f in kept]
        listing = [[os.path.relpath(f.path, root), f.label, os.path.getsize(f.path)] for f in kept]
        fingerprint = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:20]
        if cache is not None:
            stacked = np.stack(cache)

            def load(idx):
                return preprocess.normalize(stacked[idx])

        else:
            pool = ThreadPoolExecutor(workers, thread_name_prefix="finetune-io")

            def load(idx):
                return np.stack(list(pool.map(lambda i: preprocess(paths[i]), idx)))

        images = cls(
            [f.label for f in kept],
            load,
            [row[0] for row in listing],
            fingerprint=fingerprint,
        )
        images.skipped = skipped
        images.loose = [f.path for f in loose]
        return images


def split_holdout(identities, holdout=0.2, by="identity", seed=0):
    """(train indices, held-out indices), seeded.

    by="identity": round(holdout * identities) whole identities are held out
    (open-set): at least 2, so that different-identity pairs exist, and at most
    all but 2, so that ArcFace has 2 identities to train on.
    by="image": of each identity with n >= 2 images, round(holdout * n) images
    are held out, at least 2 when n >= 3 (so that it gives a same-identity
    pair) and at least 1, never all of them.
    """
    identities = np.asarray(identities)
    n = len(identities)
    if holdout <= 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    if not 0 < holdout < 1:
        raise FinetuneConfigError(f"holdout must be in [0, 1), got {holdout}.")
    rng = np.random.default_rng(seed)
    names = np.unique(identities)
    held = np.zeros(n, dtype=bool)
    if by == "identity":
        if len(names) < 4:
            raise FinetuneDataError(
                f"Holding out whole identities needs at least 4 identities (2 held out for "
                f"different-identity pairs, 2 to train), found {len(names)}; add identities, "
                "use holdout_by='image' (--holdout-by image), or holdout=0 (--holdout 0) to "
                "train without a held-out check."
            )
        count = min(max(2, round(holdout * len(names))), len(names) - 2)
        chosen = rng.choice(names, size=count, replace=False)
        held[np.isin(identities, chosen)] = True
    elif by == "image":
        for name in names:
            idx = np.flatnonzero(identities == name)
            if len(idx) < 2:
                continue
            least = 2 if len(idx) >= 3 else 1
            count = min(max(least, round(holdout * len(idx))), len(idx) - 1)
            held[rng.choice(idx, size=count, replace=False)] = True
    else:
        raise FinetuneConfigError(f"holdout_by must be 'identity' or 'image', got {by!r}.")
    return np.flatnonzero(~held), np.flatnonzero(held)


def check_split(identities, train_idx, held_idx, config: FinetuneConfig) -> str:
    """Refuse a split that cannot train or be evaluated; else say what was held out.

    Raises `FinetuneDataError` saying why and what to change.
    """
    identities = np.asarray(identities)
    names, per_identity = np.unique(identities, return_counts=True)
    train_names = np.unique(identities[train_idx])
    held_names, held_counts = np.unique(identities[held_idx], return_counts=True)
    if len(train_names) < 2:
        raise FinetuneDataError(
            f"Only {len(train_names)} identity left to train on ({len(names)} in the data, "
            f"{len(held_names)} held out); ArcFace needs at least 2: add identities or lower "
            "the holdout (--holdout)."
        )
    if config.holdout == 0:
        return f"no held-out check (holdout 0); training on {len(names)} identities"
    # what can be changed, given the data
    fixes = ["add images (3 or more per identity)"]
    if config.holdout_by == "identity" and per_identity.max() >= 3:
        fixes.append("use --holdout-by image (holdout_by='image')")
    fixes.append("or pass --holdout 0 (holdout=0) to train without a held-out check")
    fixes = ", ".join(fixes)
    most = int(per_identity.max())
    if len(held_idx) == 0:
        raise FinetuneDataError(
            f"Nothing could be held out: --holdout-by image holds out images of identities "
            f"with 2 or more, and the most any identity has is {most}; {fixes}."
        )
    if len(held_names) < 2:
        raise FinetuneDataError(
            f"The held-out images belong to {len(held_names)} identity, so no "
            f"different-identity pairs can be scored; {fixes}."
        )
    if held_counts.max() < 2:
        what = (
            f"the {len(held_names)} held-out identities have one image each"
            if config.holdout_by == "identity"
            else f"no identity has more than {most} images, so one of each is held out"
        )
        raise FinetuneDataError(f"No same-identity pair can be held out: {what}; {fixes}.")
    if config.holdout_by == "identity":
        asked = round(config.holdout * len(names))
        why = (
            ""
            if asked == len(held_names)
            else f" (holdout {config.holdout:g} of {len(names)} rounds to {asked}; at least 2 "
            "are held out for different-identity pairs and at least 2 are kept for training)"
        )
        return (
            f"held out {len(held_names)} of {len(names)} identities{why}, {len(held_idx)} "
            f"images, never trained on; training on {len(train_names)} identities, "
            f"{len(train_idx)} images"
        )
    return (
        f"held out {len(held_idx)} images of {len(held_names)} identities (a share of each, "
        f"--holdout-by image); training on {len(train_idx)} images of {len(train_names)} "
        "identities"
    )


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


class TrainBatches(keras.utils.PyDataset):
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
        self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))

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


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------


def build_training_model(
    embedding_model: keras.Model, num_classes: int, scale=30.0, margin=0.35, easy_margin=False
) -> keras.Model:
    """[images, class ids] -> ArcFace logits, with `embedding_model` nested inside."""
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
    """Freeze / unfreeze everything but the projection (ArcFace always trains): a
    `ConvNeXt`'s `head_fc` (its projection in an embedding model), another model's
    `embedding_projection`."""
    projections = {PROJECTION_NAME, "head_fc"}
    for layer in embedding_model.layers:
        layer.trainable = True if layer.name in projections else trainable


def save_model(model: keras.Model, path, meta: dict | None = None) -> None:
    """Atomically write `model` to `path` (.keras) and, beside it, the sidecar config
    (`weights_convert.sidecar_path`: pretrained_cfg, architecture, `meta`)."""
    weights_convert.save_converted(model, path, extra=meta)


def load_model(path) -> keras.Model:
    """A model written by `save_model` / `finetune`, with its `pretrained_cfg` attribute.

    Every custom layer is registered (this module's imports) before the load.
    """
    return weights_convert.load_converted(path)


def load_training_checkpoint(path) -> keras.Model:
    """The compiled ArcFace training model of a checkpoint folder's `train.keras`."""
    with keras.saving.custom_object_scope(checkpoint_custom_objects()):
        return keras.saving.load_model(path)


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
        raise FinetuneConfigError(
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
    if not np.all(np.isfinite(emb)):
        raise FinetuneDataError(
            "The model gives NaN or infinite embeddings on the held-out images (a diverged "
            "run: lower the learning rate; or a broken checkpoint / normalisation)."
        )
    i, j, same = verification_pairs(images.identities[indices], max_pairs, seed)
    scores = np.sum(emb[i] * emb[j], axis=1)
    return verification_metrics(scores, same, folds=None)


# ----------------------------------------------------------------------------
# Run identity: what a checkpoint must match to be resumed
# ----------------------------------------------------------------------------


def _hash_files(paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:20]


def model_fingerprint(model) -> dict:
    """{"model": what was given, "model_content": a hash of its content}.

    A `keras.Model`: its weights (names are not used: they change with every
    model built in a process). A local file or folder: its weights and config
    files. A Hub id: the Hub cache's content hash (the id alone if not cached).
    """
    if isinstance(model, keras.Model):
        digest = hashlib.sha256(json.dumps(list(model.input_shape)).encode())
        for weight in model.get_weights():
            array = np.ascontiguousarray(weight)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        return {"model": f"<keras.Model {model.name}>", "model_content": digest.hexdigest()[:20]}
    source = os.fspath(model)
    if os.path.isdir(source):
        files = [
            os.path.join(source, name)
            for name in ("model.safetensors", "config.json")
            if os.path.isfile(os.path.join(source, name))
        ]
        return {"model": os.path.abspath(source), "model_content": _hash_files(files)}
    if os.path.isfile(source):
        files = [source]
        sidecar = (
            weights_convert.sidecar_path(source)
            if source.endswith(".keras")
            else os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")
        )
        if os.path.isfile(sidecar):
            files.append(sidecar)
        return {"model": os.path.abspath(source), "model_content": _hash_files(files)}
    fingerprint = embedding_model_module.source_fingerprint(source)
    return {"model": source, "model_content": fingerprint or source}


def run_identity(config: FinetuneConfig, model_id: dict, devices: int, images=None) -> dict:
    """Everything a resumed run must share with the run that wrote the checkpoint
    (without `images`: all but the data, to check before the data is read)."""
    identity = {**config.to_dict(), **model_id, "devices": devices}
    if images is not None:
        identity["data"] = images.fingerprint
        count = len(np.unique(images.identities))
        identity["data_size"] = f"{len(images)} images of {count} identities"
    return identity


# what to call each entry of `run_identity` in a refusal (the CLI option in brackets)
_DESCRIPTIONS = {
    "data": "data (the images or the listing of the data folder)",
    "model_content": "model content (the checkpoint's weights)",
    "model": "model source",
}


def identity_differences(saved: dict, current: dict) -> list[str]:
    """One "name: was X, now Y" line per entry of `run_identity` that differs."""
    lines = []
    for key in current:
        if key in ("data_size", "model"):
            continue
        was, now = saved.get(key, "<not recorded>"), current[key]
        if was == now or (key == "devices" and key not in saved):
            continue
        if key == "data":
            was, now = saved.get("data_size", was), current["data_size"]
            if was == now:
                was, now = "other files of the same count", "these"
        elif key == "model_content":
            was, now = saved.get("model", was), current["model"]
            if was == now:
                was, now = f"{was} (other content)", "its current content"
        lines.append(f"{_DESCRIPTIONS.get(key, key)}: was {was}, now {now}")
    return lines


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
    config: FinetuneConfig | None = None
    split: str = ""  # what was held out, in words
    skipped: list = field(default_factory=list)  # ImageLoadError of unreadable images
    resumed_from: int = 0  # the epoch a resumed run continued after (0: a fresh run)

    @property
    def improved(self) -> bool:
        """Whether training beat the input model on the held-out pairs."""
        return self.best_epoch > 0


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
    try:
        if source.endswith(".keras"):
            loaded = load_model(source)
            if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 4:
                shapes = [tuple(i.shape) for i in loaded.inputs]
                raise ValueError(
                    f"not an image model (its inputs are {shapes});"
                    " a fine-tuning checkpoint (train.keras) cannot be fine-tuned again, its -o "
                    "output can"
                )
            return loaded
        return embedding_model_module.build_model(
            source,
            pooling=pooling,
            head_norm=head_norm,
            input_shape=input_shape,
            cache=cache,
            cache_dir=cache_dir,
        )
    except (InputError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        reason = (
            (error.strerror + f": {error.filename}")
            if isinstance(error, OSError) and error.strerror
            else str(error)
        )
        raise ModelSourceError(source, reason or type(error).__name__) from error


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


def _say(verbose, text):
    if verbose:
        print(text, flush=True)


def _check_source_exists(model):
    if isinstance(model, keras.Model):
        return
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be a keras.Model, a .keras file or a checkpoint source, got "
            f"{type(model).__name__}."
        )
    problem = weights_convert.source_problem(model)
    if problem is not None:
        raise ModelSourceError(os.fspath(model), problem)


def _read_state(state_path, model_path, identity, checkpoint_dir):
    """The checkpoint's state if it belongs to this run, else `ResumeMismatchError`."""
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise ResumeMismatchError(
            f"Checkpoint {checkpoint_dir} cannot be read ({error}); pass resume=False "
            "(--no-resume) to start over."
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeMismatchError(
            f"Checkpoint {checkpoint_dir} is from a different run (written by another version "
            "of this library); pass resume=False (--no-resume) to start over, or another "
            "checkpoint folder."
        )
    differences = identity_differences(state.get("identity", {}), identity)
    if differences:
        raise ResumeMismatchError(
            f"Checkpoint {checkpoint_dir} is from a different run; what differs: "
            + "; ".join(differences)
            + ". Pass resume=False (--no-resume) to start over, or another checkpoint folder "
            "(--checkpoint-dir)."
        )
    if not os.path.isfile(model_path):
        raise ResumeMismatchError(
            f"Checkpoint {checkpoint_dir} has {CHECKPOINT_STATE} but no {CHECKPOINT_MODEL}; "
            "pass resume=False (--no-resume) to start over."
        )
    return state


def finetune(
    data,
    model,
    *,
    output=None,
    config: FinetuneConfig | None = None,
    checkpoint_dir=None,
    resume: bool = True,
    keep_checkpoint: bool = False,
    distribution="auto",
    eval_batch_size: int | None = None,
    cache: bool = True,
    cache_dir=None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    verbose: int = 1,
    **settings,
) -> FinetuneResult:
    """Fine-tune `model` on `data` with ArcFace; see the module docstring.

    Args:
        data: a folder with one sub-folder of images per identity, an `ImageSet`,
            or a tuple (images (N, H, W, 3) preprocessed float32, labels (N,)).
        model: a `keras.Model` (embedding model, backbone or feature extractor),
            a `.keras` file, or a checkpoint source for `embedding.build_model`
            (Hub id, folder, .safetensors).
        output: where to write the best embedding model (.keras), or None.
        config: the run's `FinetuneConfig`; `**settings` (its field names:
            epochs=..., batch_size=..., ...) override single fields.
        checkpoint_dir: training state after every epoch (default
            `<output>.ckpt`, or none without `output`); `resume` continues from
            it (also in a new process) if it belongs to the same run (same
            config, model content, data and device count), else raises
            `ResumeMismatchError` naming what differs; removed at the end
            unless `keep_checkpoint`.
        distribution: "auto" (DataParallel over all devices on JAX with more
            than one), None, or a `keras.distribution.Distribution`.
        eval_batch_size: batch size of the held-out embedding.
        cache, cache_dir: the converted-model cache of `build_model`.
        max_pixels, workers: folder images: the decompression-bomb limit and
            the decoding threads.
        verbose: 0 silent, 1 progress bars and a line per epoch, 2 lines only.

    Errors, all raised before any training: `FinetuneConfigError` (a setting
    out of range), `OutputPathError` (an output that is not a writable
    `.keras` path), `ModelSourceError` (a model that cannot be loaded),
    `FinetuneDataError` (data that cannot train or be evaluated, saying why
    and what to change), `ResumeMismatchError`.
    """
    config = (config or FinetuneConfig()).replace(**settings)
    if output is not None:
        output = check_output_path(output, option="output", suffixes=(".keras",))
    if checkpoint_dir is None and output is not None:
        checkpoint_dir = os.fspath(output) + ".ckpt"
    if checkpoint_dir is not None:
        check_output_path(os.path.join(checkpoint_dir, CHECKPOINT_STATE), option="checkpoint_dir")
    _check_source_exists(model)
    # data that cannot train is refused before the model is loaded (folders: from the listing)
    if isinstance(data, (str, os.PathLike)):
        files, _ = identity_folders(data)
        labels = np.asarray([f.label for f in files])
        check_split(
            labels, *split_holdout(labels, config.holdout, config.holdout_by, config.seed), config
        )
        images = None
    elif isinstance(data, ImageSet):
        images = data
    elif isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise FinetuneDataError(
                f"data as a tuple must be (images, labels), got {len(data)} items."
            )
        images = ImageSet.from_arrays(*data)
    else:
        raise TypeError(
            "data must be a folder, an ImageSet or a tuple (images, labels), got "
            f"{type(data).__name__}."
        )
    distribution = resolve_distribution(distribution)
    devices = _device_count(distribution)
    process_index, process_count = _process_info(distribution)
    is_chief = process_index == 0
    if config.batch_size % (devices * process_count) and devices > 1:
        raise FinetuneConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {devices} devices "
            "in the distribution."
        )
    eval_batch_size = eval_batch_size or max(config.batch_size, 2 * devices)
    eval_batch_size = -(-eval_batch_size // devices) * devices
    model_id = model_fingerprint(model)
    state = None
    if checkpoint_dir is not None:
        model_path = os.path.join(checkpoint_dir, CHECKPOINT_MODEL)
        state_path = os.path.join(checkpoint_dir, CHECKPOINT_STATE)
        if resume and os.path.exists(state_path):  # settings and model: checked before loading
            state = _read_state(
                state_path, model_path, run_identity(config, model_id, devices), checkpoint_dir
            )
    scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
    keras.utils.set_random_seed(config.seed)
    with scope:
        size = config.image_size
        base = _load_source(
            model,
            input_shape=(size, size, 3) if size else None,
            pooling=config.pooling,
            head_norm=config.head_norm,
            cache=cache,
            cache_dir=cache_dir,
            distribution=distribution,
        )
        embedding_model = as_embedding_model(base, config.embedding_dim)
        cfg = dict(getattr(base, "pretrained_cfg", None) or {})
        height, width = embedding_model.input_shape[1:3]
        if height is not None and width is not None:
            cfg["input_size"] = [3, int(height), int(width)]
        embedding_model.pretrained_cfg = cfg

        if images is None:  # a folder: decoded once now, at the model's input size
            _say(verbose, f"reading the images of {data} (unreadable ones are skipped)")
            images = ImageSet.from_folder(
                data, Preprocessor(cfg, max_pixels=max_pixels), workers=workers
            )
        if images.loose:
            _say(
                verbose,
                f"left out {len(images.loose)} image(s) lying directly in {data} (not in an "
                "identity folder)",
            )
        if images.skipped:
            _say(verbose, f"skipped {len(images.skipped)} unreadable image(s):")
            for failure in images.skipped[:10]:
                _say(verbose, f"  {failure}")
            if len(images.skipped) > 10:
                _say(verbose, f"  ... and {len(images.skipped) - 10} more")

        train_idx, held_idx = split_holdout(
            images.identities, config.holdout, config.holdout_by, config.seed
        )
        split = check_split(images.identities, train_idx, held_idx, config)
        classes = sorted(set(images.identities[train_idx].tolist()))
        class_of = {name: k for k, name in enumerate(classes)}
        class_ids = np.array([class_of.get(name, -1) for name in images.identities.tolist()])
        per_process = config.batch_size // process_count
        batches = TrainBatches(
            images,
            train_idx,
            class_ids[train_idx],
            per_process,
            seed=config.seed,
            augment=config.augment,
            hflip=config.hflip,
            process_index=process_index,
            process_count=process_count,
        )
        steps_per_epoch = len(batches)
        tuned_steps = (config.epochs - config.freeze_epochs) * steps_per_epoch
        warmup_steps = config.warmup_steps
        if warmup_steps is None:
            warmup_steps = int(0.05 * tuned_steps)
        identity = run_identity(config, model_id, devices, images)
        if state is not None:  # and the data, now that it is read
            _read_state(state_path, model_path, identity, checkpoint_dir)
        resumed_from = 0

        def evaluate_now(m):
            if len(held_idx) == 0:
                return None
            return evaluate(m, images, held_idx, eval_batch_size, config.max_pairs, config.seed)

        def compile_phase(train_model, phase):
            frozen = phase == "frozen"
            set_backbone_trainable(embedding_model_of(train_model), not frozen)
            optimizer = _phase_optimizer(
                config.learning_rate,
                config.weight_decay,
                config.freeze_epochs * steps_per_epoch if frozen else tuned_steps,
                0 if frozen else warmup_steps,
                cosine=not frozen,
            )
            train_model.compile(
                optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=["accuracy"],
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
            try:
                train_model = load_training_checkpoint(model_path)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
                raise ResumeMismatchError(
                    f"Checkpoint {model_path} cannot be loaded ({error}); pass resume=False "
                    "(--no-resume) to start over."
                ) from error
            _exclude_from_decay(train_model.optimizer)
            embedding_model_trained = embedding_model_of(train_model)
            embedding_model_trained.pretrained_cfg = cfg
            start_epoch = resumed_from = state["epoch"]
            phase = state["phase"]
            history = state["history"]
            best_eer, best_epoch = state["best_eer"], state["best_epoch"]
            metrics_before = metrics_from(state["metrics_before"])
            best_metrics = metrics_from(state["best_metrics"])
            if output is not None and is_chief and not os.path.isfile(output):
                raise ResumeMismatchError(
                    f"Checkpoint {checkpoint_dir} belongs to {output}, which is gone (it holds "
                    "the best model so far); pass resume=False (--no-resume) to start over."
                )
            _say(
                verbose,
                f"{split}\nResuming from {checkpoint_dir} after epoch {start_epoch}/"
                f"{config.epochs}.",
            )
            embedding_model = embedding_model_trained
        else:
            train_model = build_training_model(
                embedding_model,
                len(classes),
                scale=config.scale,
                margin=config.margin,
                easy_margin=config.easy_margin,
            )
            # centres from numpy, seeded: the same start on any device layout
            centers = train_model.get_layer("arcface").centers
            fan = sum(centers.shape)
            centers.assign(
                np.random.default_rng(config.seed).uniform(-1, 1, centers.shape).astype("float32")
                * np.float32(math.sqrt(6.0 / fan))
            )
            start_epoch, phase, history = 0, None, []
            _say(
                verbose,
                f"{split}; {steps_per_epoch} steps per epoch"
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

        for epoch in range(start_epoch, config.epochs):
            wanted = "frozen" if epoch < config.freeze_epochs else "tuned"
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
                f"epoch {epoch + 1}/{config.epochs} ({phase}): loss "
                f"{record.get('loss', float('nan')):.4f}"
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
                    "format": STATE_FORMAT,
                    "identity": identity,
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
                    pooling=config.pooling,
                    head_norm=config.head_norm,
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
        if best_epoch == 0:
            _say(
                verbose,
                "training never beat the input model on the held-out pairs"
                + (f": {output} holds the untouched input model" if output else ""),
            )
    return FinetuneResult(
        model=best_model,
        metrics_before=metrics_before,
        metrics_after=best_metrics,
        best_epoch=best_epoch,
        history=history,
        output=os.fspath(output) if output is not None else None,
        config=config,
        split=split,
        skipped=list(images.skipped),
        resumed_from=resumed_from,
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
