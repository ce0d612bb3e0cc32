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
`output` (atomically; a `.keras` file that describes itself: preprocessing,
architecture, and its epoch and held-out EERs in its metadata).

The run's settings are one `FinetuneConfig`. After every epoch the full
training state (model, ArcFace centres, optimizer) and the run's settings, data
listing and model fingerprint go to a checkpoint folder; the same call in a
new process resumes from it, and a call that differs in any of them is refused
with the names of what differs. Only the embedding model is saved as the
result: ArcFace is used for training only.

With a `keras.distribution.DataParallel` distribution (JAX backend), or
`distribution="auto"` and more than one local device, every batch is split over
the devices; see the docs for several hosts.

The package, along its seams: `config` (the settings), `data` (images, the held-out
split, training batches), `models` (the ArcFace training model, saving, evaluation),
`state` (the checkpoint folder: identity and progress), `trainer` (the steps).
The command line is `embedding.cli.finetune`; nothing here imports it.
"""

from __future__ import annotations

import keras

from embedding.distribution import resolve_distribution
from embedding.finetune.config import HOLDOUT_BY, FinetuneConfig
from embedding.finetune.data import (
    IMAGE_CACHE_BYTES,
    ImageSet,
    TrainBatches,
    check_split,
    split_holdout,
    verification_pairs,
)
from embedding.finetune.models import (
    build_training_model,
    checkpoint_custom_objects,
    embed_images,
    embedding_model_of,
    evaluate,
    load_model,
    load_training_checkpoint,
    save_model,
    set_backbone_trainable,
)
from embedding.finetune.state import (
    CHECKPOINT_MODEL,
    CHECKPOINT_STATE,
    STATE_FORMAT,
    identity_differences,
    model_fingerprint,
    run_identity,
)
from embedding.finetune.trainer import (
    FinetuneResult,
    Training,
    distribution_scope,
    finish,
    load_embedding_model,
    load_images,
    plan_run,
    split_images,
)
from embedding.images import DEFAULT_MAX_PIXELS
from embedding.model import as_embedding_model

__all__ = [
    "CHECKPOINT_MODEL", "CHECKPOINT_STATE", "HOLDOUT_BY", "IMAGE_CACHE_BYTES", "STATE_FORMAT",
    "FinetuneConfig", "FinetuneResult", "ImageSet", "TrainBatches", "as_embedding_model",
    "build_training_model", "check_split", "checkpoint_custom_objects", "embed_images",
    "embedding_model_of", "evaluate", "finetune", "identity_differences", "load_model",
    "load_training_checkpoint", "model_fingerprint", "resolve_distribution", "run_identity",
    "save_model", "set_backbone_trainable", "split_holdout", "verification_pairs",
]  # fmt: skip


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

    data: a folder with one sub-folder of images per identity, an `ImageSet`, or a tuple
    (images (N, H, W, 3) preprocessed float32, labels (N,)). model: a `keras.Model`
    (embedding model, backbone or feature extractor), a `.keras` file, or a checkpoint
    source for `embedding.build_model`. output: where to write the best embedding model
    (.keras), or None. config: the run's `FinetuneConfig`; `**settings` (its field
    names: epochs=..., ...) override single fields. checkpoint_dir: training state
    after every epoch (default `<output>.ckpt`, or none without `output`); `resume`
    continues from it when it belongs to the same run (same config, model content, data
    and device count), else raises `ResumeMismatchError` naming what differs; removed
    at the end unless `keep_checkpoint`. distribution: "auto" (DataParallel over all
    devices on JAX with more than one), None, or a `keras.distribution.Distribution`.
    eval_batch_size: batch size of the held-out embedding. cache, cache_dir:
    `build_model`'s converted-model cache. max_pixels, workers: folder images'
    decompression-bomb limit and decoding threads. verbose: 0 silent, 1 progress bars
    and a line per epoch, 2 lines only.

    Errors, all raised before any training: `FinetuneConfigError` (a setting out of
    range), `OutputPathError` (an output that is not a writable `.keras` path),
    `ModelSourceError` (a model that cannot be loaded), `FinetuneDataError` (data that
    cannot train or be evaluated, saying why and what to change), `ResumeMismatchError`.
    """
    config = (config or FinetuneConfig()).replace(**settings)
    plan = plan_run(
        data,
        model,
        output=output,
        config=config,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        distribution=distribution,
        eval_batch=eval_batch_size,
    )
    keras.utils.set_random_seed(config.seed)
    with distribution_scope(plan):
        embedding_model, cfg = load_embedding_model(model, config, plan, cache, cache_dir)
        images = load_images(
            data, plan, cfg, max_pixels=max_pixels, workers=workers, verbose=verbose
        )
        training = Training(plan, split_images(images, plan), images, embedding_model, cfg)
        if plan.state is not None:
            training.resume(verbose)
        else:
            training.start(verbose)
        for epoch in range(training.progress.epoch, config.epochs):
            training.run_epoch(epoch, verbose)
        return finish(training, keep_checkpoint=keep_checkpoint, verbose=verbose)
