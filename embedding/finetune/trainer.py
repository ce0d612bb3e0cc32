"""The steps of a fine-tuning run, in the order `embedding.finetune.finetune` takes them:
settle everything that can be refused before a model loads (`plan_run`), load the model
and the data, split them, start or resume the ArcFace training model, train epoch by
epoch (held-out evaluation, best model, checkpoint after each), and finish."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field

import keras
import numpy as np

import weights_convert
from convnext_common.files import check_output_path
from embedding.distribution import clone_under, device_count, process_info, resolve_distribution
from embedding.errors import (
    FinetuneConfigError,
    FinetuneDataError,
    InputError,
    ModelSourceError,
    ResumeMismatchError,
)
from embedding.files import identity_folders
from embedding.finetune.config import FinetuneConfig
from embedding.finetune.data import ImageSet, TrainBatches, check_split, split_holdout
from embedding.finetune.models import (
    build_training_model,
    embedding_model_of,
    evaluate,
    exclude_from_decay,
    load_model,
    load_training_checkpoint,
    phase_optimizer,
    save_model,
    set_backbone_trainable,
)
from embedding.finetune.state import (
    CHECKPOINT_STATE,
    CheckpointFolder,
    Progress,
    check_source_exists,
    model_fingerprint,
    run_identity,
)
from embedding.model import as_embedding_model, build_model
from embedding.preprocess import Preprocessor


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


def say(verbose, text):
    if verbose:
        print(text, flush=True)


# ----------------------------------------------------------------------------
# Before the model loads
# ----------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What is settled before a model loads: the settings, outputs, devices and the
    identity checked against a checkpoint to resume."""

    config: FinetuneConfig
    output: str | None
    checkpoints: CheckpointFolder
    distribution: object
    devices: int
    process_index: int
    process_count: int
    eval_batch_size: int
    model_id: dict
    images: ImageSet | None  # given as arrays / an ImageSet; a folder is read later
    state: dict | None  # the checkpoint's, when resuming

    @property
    def is_chief(self) -> bool:  # the process that writes outputs and checkpoints
        return self.process_index == 0


def plan_run(data, model, *, output, config, checkpoint_dir, resume, distribution, eval_batch):
    """A `RunPlan`, or the refusal of settings, outputs, model source, data (folders: from
    their listing) or checkpoint that cannot work, before anything heavy is read."""
    if output is not None:
        output = check_output_path(output, option="output", suffixes=(".keras",))
    if checkpoint_dir is None and output is not None:
        checkpoint_dir = os.fspath(output) + ".ckpt"
    if checkpoint_dir is not None:
        check_output_path(os.path.join(checkpoint_dir, CHECKPOINT_STATE), option="checkpoint_dir")
    check_source_exists(model)
    images = _given_images(data, config)
    distribution = resolve_distribution(distribution)
    devices = device_count(distribution)
    process_index, process_count = process_info(distribution)
    if process_count > 1:  # TrainBatches gives each process its own share already
        distribution.auto_shard_dataset = False
    if config.batch_size % devices and devices > 1:
        raise FinetuneConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {devices} devices "
            "in the distribution (every device gets an equal share of every batch)."
        )
    eval_batch = eval_batch or max(config.batch_size, 2 * devices)
    model_id = model_fingerprint(model)
    checkpoints = CheckpointFolder(checkpoint_dir)
    state = None
    if resume and checkpoints.has_state():  # settings and model: checked before loading
        state = checkpoints.read(run_identity(config, model_id, devices))
    return RunPlan(
        config=config,
        output=output,
        checkpoints=checkpoints,
        distribution=distribution,
        devices=devices,
        process_index=process_index,
        process_count=process_count,
        eval_batch_size=-(-eval_batch // devices) * devices,
        model_id=model_id,
        images=images,
        state=state,
    )


def _given_images(data, config: FinetuneConfig) -> ImageSet | None:
    """The `ImageSet` of data given in memory; None for a folder, whose listing must
    split into a set that can train and be evaluated (checked now, read later)."""
    if isinstance(data, (str, os.PathLike)):
        files, _ = identity_folders(data)
        labels = np.asarray([f.label for f in files])
        check_split(
            labels, *split_holdout(labels, config.holdout, config.holdout_by, config.seed), config
        )
        return None
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise FinetuneDataError(
                f"data as a tuple must be (images, labels), got {len(data)} items."
            )
        return ImageSet.from_arrays(*data)
    raise TypeError(
        "data must be a folder, an ImageSet or a tuple (images, labels), got "
        f"{type(data).__name__}."
    )


# ----------------------------------------------------------------------------
# The model and the data
# ----------------------------------------------------------------------------


def load_embedding_model(model, config: FinetuneConfig, plan: RunPlan, cache, cache_dir):
    """The embedding model to train (under the plan's distribution) and the
    `pretrained_cfg` it keeps, its input size set to the model's."""
    size = config.image_size
    base = load_source(
        model,
        input_shape=(size, size, 3) if size else None,
        pooling=config.pooling,
        head_norm=config.head_norm,
        cache=cache,
        cache_dir=cache_dir,
        distribution=plan.distribution,
    )
    embedding_model = as_embedding_model(base, config.embedding_dim)
    cfg = dict(getattr(base, "pretrained_cfg", None) or {})
    height, width = embedding_model.input_shape[1:3]
    if height is not None and width is not None:
        cfg["input_size"] = [3, int(height), int(width)]
    embedding_model.pretrained_cfg = cfg
    return embedding_model, cfg


def load_source(model, *, input_shape, pooling, head_norm, cache, cache_dir, distribution):
    """A `keras.Model` (cloned under `distribution`), a `.keras` file this project wrote,
    or a checkpoint source for `build_model`; `ModelSourceError` naming what failed."""
    if isinstance(model, keras.Model):
        return clone_under(model, distribution)
    source = os.fspath(model)
    try:
        if weights_convert.source_kind(source) == "keras":
            loaded = load_model(source)
            if len(loaded.inputs) != 1 or len(loaded.inputs[0].shape) != 4:
                shapes = [tuple(i.shape) for i in loaded.inputs]
                raise ValueError(
                    f"not an image model (its inputs are {shapes});"
                    " a fine-tuning checkpoint (train.keras) cannot be fine-tuned again, its -o "
                    "output can"
                )
            return loaded
        return build_model(
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


def load_images(data, plan: RunPlan, cfg, *, max_pixels, workers, verbose) -> ImageSet:
    """The run's images: given, or a folder decoded once now at the model's input size;
    what was left out is reported."""
    images = plan.images
    if images is None:
        say(verbose, f"reading the images of {data} (unreadable ones are skipped)")
        preprocess = Preprocessor(cfg, max_pixels=max_pixels)
        images = ImageSet.from_folder(data, preprocess, workers=workers)
    if images.loose:
        say(
            verbose,
            f"left out {len(images.loose)} image(s) lying directly in {data} (not in an "
            "identity folder)",
        )
    if images.skipped:
        say(verbose, f"skipped {len(images.skipped)} unreadable image(s):")
        for failure in images.skipped[:10]:
            say(verbose, f"  {failure}")
        if len(images.skipped) > 10:
            say(verbose, f"  ... and {len(images.skipped) - 10} more")
    return images


@dataclass
class Split:
    """The held-out split, in indices and in words, and the training batches."""

    train: np.ndarray
    held: np.ndarray
    words: str
    classes: list
    batches: TrainBatches


def split_images(images: ImageSet, plan: RunPlan) -> Split:
    config = plan.config
    train_idx, held_idx = split_holdout(
        images.identities, config.holdout, config.holdout_by, config.seed
    )
    words = check_split(images.identities, train_idx, held_idx, config)
    classes = sorted(set(images.identities[train_idx].tolist()))
    class_of = {name: k for k, name in enumerate(classes)}
    class_ids = np.array([class_of.get(name, -1) for name in images.identities.tolist()])
    batches = TrainBatches(
        images,
        train_idx,
        class_ids[train_idx],
        config.batch_size,
        seed=config.seed,
        augment=config.augment,
        hflip=config.hflip,
        process_index=plan.process_index,
        process_count=plan.process_count,
    )
    return Split(train_idx, held_idx, words, classes, batches)


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


class Training:
    """The training model and the run's progress, epoch by epoch."""

    def __init__(self, plan: RunPlan, split: Split, images: ImageSet, embedding_model, cfg):
        self.plan, self.split, self.images, self.cfg = plan, split, images, cfg
        self.embedding_model = embedding_model
        config = plan.config
        self.steps_per_epoch = len(split.batches)
        self.tuned_steps = (config.epochs - config.freeze_epochs) * self.steps_per_epoch
        self.warmup_steps = config.warmup_steps
        if self.warmup_steps is None:
            self.warmup_steps = int(0.05 * self.tuned_steps)
        self.identity = run_identity(config, plan.model_id, plan.devices, images)
        self.train_model = None
        self.progress = Progress()
        self.resumed_from = 0
        self.scratch = None  # another process's throwaway copies of what process 0 writes

    def evaluate_now(self, model):
        if len(self.split.held) == 0:
            return None
        config = self.plan.config
        return evaluate(
            model,
            self.images,
            self.split.held,
            self.plan.eval_batch_size,
            config.max_pairs,
            config.seed,
            distribution=self.plan.distribution,
        )

    def start(self, verbose):
        """A fresh ArcFace training model; the input model evaluated (epoch 0) and, when it
        has a held-out score, written as the output so far."""
        config, plan = self.plan.config, self.plan
        self.train_model = build_training_model(
            self.embedding_model,
            len(self.split.classes),
            scale=config.scale,
            margin=config.margin,
            easy_margin=config.easy_margin,
        )
        # centres from numpy, seeded: the same start on any device layout
        centers = self.train_model.get_layer("arcface").centers
        fan = sum(centers.shape)
        centers.assign(
            np.random.default_rng(config.seed).uniform(-1, 1, centers.shape).astype("float32")
            * np.float32(math.sqrt(6.0 / fan))
        )
        say(
            verbose,
            f"{self.split.words}; {self.steps_per_epoch} steps per epoch"
            + (f" on {plan.devices} devices" if plan.devices > 1 else ""),
        )
        before = self.evaluate_now(self.embedding_model)
        self.progress = Progress(metrics_before=before, best_metrics=before)
        if before is not None:
            self.progress.best_eer = before.eer
            say(verbose, f"held-out before: EER {before.eer:.4f}")
            if plan.output is not None:
                save_model(self.embedding_model, self.target(plan.output), _meta(0, before, before))

    def resume(self, verbose):
        """The training model and progress of the checkpoint (checked again now that the
        data is read)."""
        plan, checkpoints = self.plan, self.plan.checkpoints
        state = checkpoints.read(self.identity)
        try:
            self.train_model = load_training_checkpoint(checkpoints.model_path)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise ResumeMismatchError(
                f"Checkpoint {checkpoints.model_path} cannot be loaded ({error}); pass "
                "resume=False (--no-resume) to start over."
            ) from error
        exclude_from_decay(self.train_model.optimizer)
        self.embedding_model = embedding_model_of(self.train_model)
        self.embedding_model.pretrained_cfg = self.cfg
        self.progress = Progress.from_state(state)
        self.resumed_from = self.progress.epoch
        if plan.output is not None and plan.is_chief and not os.path.isfile(plan.output):
            raise ResumeMismatchError(
                f"Checkpoint {checkpoints.folder} belongs to {plan.output}, which is gone (it "
                "holds the best model so far); pass resume=False (--no-resume) to start over."
            )
        say(
            verbose,
            f"{self.split.words}\nResuming from {checkpoints.folder} after epoch "
            f"{self.progress.epoch}/{plan.config.epochs}.",
        )

    def compile_phase(self, phase):
        config = self.plan.config
        frozen = phase == "frozen"
        set_backbone_trainable(embedding_model_of(self.train_model), not frozen)
        optimizer = phase_optimizer(
            config.learning_rate,
            config.weight_decay,
            config.freeze_epochs * self.steps_per_epoch if frozen else self.tuned_steps,
            0 if frozen else self.warmup_steps,
            cosine=not frozen,
        )
        self.train_model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    def run_epoch(self, epoch, verbose):
        """Train one epoch, evaluate, keep the model if it is the best so far, checkpoint."""
        plan, progress = self.plan, self.progress
        wanted = "frozen" if epoch < plan.config.freeze_epochs else "tuned"
        if wanted != progress.phase:
            self.compile_phase(wanted)
            progress.phase = wanted
        self.split.batches.set_epoch(epoch)
        started = time.time()
        fit = self.train_model.fit(
            self.split.batches,
            initial_epoch=epoch,
            epochs=epoch + 1,
            shuffle=False,  # TrainBatches shuffles, seeded by epoch (resumable)
            verbose=verbose if verbose in (0, 1, 2) else "auto",
        )
        record = {k: float(v[-1]) for k, v in fit.history.items()}
        record.update(
            epoch=epoch + 1, phase=progress.phase, seconds=round(time.time() - started, 2)
        )
        metrics = self.evaluate_now(self.embedding_model)
        if metrics is not None:
            record["heldout_eer"] = metrics.eer
        improved = metrics is None or metrics.eer < progress.best_eer
        if improved:
            progress.best_eer = metrics.eer if metrics is not None else math.inf
            progress.best_epoch, progress.best_metrics = epoch + 1, metrics
            if plan.output is not None:
                meta = _meta(epoch + 1, progress.metrics_before, metrics)
                save_model(self.embedding_model, self.target(plan.output), meta)
        progress.history.append(record)
        progress.epoch = epoch + 1
        say(verbose, _epoch_line(plan, record, metrics, improved, progress))
        if plan.checkpoints.folder is not None:
            checkpoints = plan.checkpoints
            if not plan.is_chief:
                checkpoints = CheckpointFolder(self.target(os.path.join(checkpoints.folder, "")))
            checkpoints.write(self.train_model, progress, self.identity)

    def target(self, path) -> str:
        """Where this process writes `path`: there (process 0), else into a scratch folder
        (saving a model spread over several processes is a collective: every process
        saves, one keeps the file)."""
        if self.plan.is_chief:
            return path
        if self.scratch is None:
            self.scratch = tempfile.mkdtemp(prefix="finetune-process-")
        name = os.path.basename(os.path.normpath(path)) or "out"
        return os.path.join(self.scratch, name)

    def best_model(self):
        """The best embedding model: the output's (reloaded, and under the distribution
        laid out again), or the one trained when there is no output."""
        plan = self.plan
        if plan.output is None:
            return self.embedding_model
        # every process loads it (a collective); another process its own copy when it
        # made one in this run, else process 0's (written before a resume, on shared storage)
        own = self.target(plan.output)
        best = load_model(own if os.path.isfile(own) else plan.output)
        if plan.distribution is not None:
            best = clone_under(best, plan.distribution)
            best.pretrained_cfg = self.cfg
        return best


def _epoch_line(plan, record, metrics, improved, progress) -> str:
    return (
        f"epoch {record['epoch']}/{plan.config.epochs} ({progress.phase}): loss "
        f"{record.get('loss', float('nan')):.4f}"
        + (f", held-out EER {metrics.eer:.4f}" if metrics is not None else "")
        + (
            " (best, saved)"
            if improved and plan.output
            else f" (best {progress.best_eer:.4f} @ {progress.best_epoch})"
        )
    )


def _meta(epoch, before, after):
    return {
        "epoch": epoch,
        "heldout_eer_before": None if before is None else before.eer,
        "heldout_eer": None if after is None else after.eer,
    }


def distribution_scope(plan: RunPlan):
    return plan.distribution.scope() if plan.distribution is not None else contextlib.nullcontext()


def finish(training: Training, *, keep_checkpoint, verbose) -> FinetuneResult:
    """The result; the checkpoint folder removed unless kept; the outcome said."""
    plan, progress = training.plan, training.progress
    best = training.best_model()
    if training.scratch is not None:
        shutil.rmtree(training.scratch, ignore_errors=True)
    if plan.checkpoints.folder is not None and not keep_checkpoint and plan.is_chief:
        shutil.rmtree(plan.checkpoints.folder, ignore_errors=True)
    before, after = progress.metrics_before, progress.best_metrics
    if after is not None and before is not None:
        say(
            verbose,
            f"held-out EER: {before.eer:.4f} before, {after.eer:.4f} after "
            f"(epoch {progress.best_epoch})" + (f"; wrote {plan.output}" if plan.output else ""),
        )
        if progress.best_epoch == 0:
            say(
                verbose,
                "training never beat the input model on the held-out pairs"
                + (f": {plan.output} holds the untouched input model" if plan.output else ""),
            )
    return FinetuneResult(
        model=best,
        metrics_before=before,
        metrics_after=after,
        best_epoch=progress.best_epoch,
        history=progress.history,
        output=os.fspath(plan.output) if plan.output is not None else None,
        config=plan.config,
        split=training.split.words,
        skipped=list(training.images.skipped),
        resumed_from=training.resumed_from,
    )
