"""Fine-tuning data: labelled images (`ImageSet`), the held-out split and its check, the
verification pairs scored on it, and the shuffled, augmented training batches."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np

from convnext_common.errors import without_traceback
from embedding.errors import FinetuneConfigError, FinetuneDataError, ImageLoadError
from embedding.files import identity_folders
from embedding.finetune.config import FinetuneConfig
from embedding.preprocess import Preprocessor

# preprocessed folder images up to this size stay in memory (decoded once for the check anyway)
IMAGE_CACHE_BYTES = 1 << 30

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


def _augment(batch, rng, hflip, shift, total, rows):
    """Random horizontal flips and translations (reflect padding) of a batch, drawn for
    the whole global batch of `total` samples of which `batch` holds `rows` (so a sample
    is augmented alike however many processes share the batch)."""
    out = batch.copy()
    flip = (rng.random(total) < 0.5)[rows] if hflip else np.zeros(len(out), bool)
    out[flip] = out[flip, :, ::-1]
    if shift > 0:
        h, w = out.shape[1:3]
        padded = np.pad(out, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
        dy = rng.integers(0, 2 * shift + 1, size=total)[rows]
        dx = rng.integers(0, 2 * shift + 1, size=total)[rows]
        for k in range(len(out)):
            out[k] = padded[k, dy[k] : dy[k] + h, dx[k] : dx[k] + w]
    return out


class TrainBatches(keras.utils.PyDataset):
    """Shuffled full batches ((images, class ids), class ids); epoch `e` uses seed (seed, e).

    `batch_size` is the global batch. With several processes (multi-host JAX), each
    yields its share of every global batch (samples process_index::process_count); the
    order and the augmentation are drawn for the global batch, so the run trains on the
    same batches whatever the number of processes.
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
        batch = self._order[step * self.batch_size : (step + 1) * self.batch_size]
        rows = slice(self.process_index, None, self.process_count)
        picks = batch[rows]
        x = self.images.load(self.indices[picks])
        y = self.class_ids[picks].astype("int32")
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, step])
            shift = self.shift if self.shift is not None else max(1, x.shape[1] // 16)
            x = _augment(x, rng, self.hflip, shift, len(batch), rows)
        return (x, y), y
