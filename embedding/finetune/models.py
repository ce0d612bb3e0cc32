"""The models of a fine-tuning run: the ArcFace training model around the embedding
model, its optimizer per phase, how it is saved and loaded, and the held-out evaluation."""

from __future__ import annotations

import keras
import numpy as np

import convnext_layers  # noqa: F401  (registers the ConvNeXt layers a checkpoint may hold)
import weights_convert
from embedding.arcface import ArcFace
from embedding.distribution import gather_rows, process_info, process_share
from embedding.errors import FinetuneDataError
from embedding.finetune.data import ImageSet, verification_pairs
from embedding.metrics import verification_metrics
from embedding.model import PROJECTION_NAMES, predict_padded


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
    """Freeze / unfreeze everything but the projection (`embedding.model.PROJECTION_NAMES`:
    a `ConvNeXt`'s `head_fc`, another model's `embedding_projection`); ArcFace always
    trains."""
    for layer in embedding_model.layers:
        layer.trainable = True if layer.name in PROJECTION_NAMES else trainable


def phase_optimizer(lr, weight_decay, steps, warmup_steps, cosine):
    """AdamW for one phase: a cosine schedule with linear warm-up (`cosine`), else constant."""
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
    exclude_from_decay(optimizer)
    return optimizer


def exclude_from_decay(optimizer):
    """No weight decay on biases, norm scales / offsets and the (normalised) ArcFace centres;
    not part of the optimizer's config, so re-applied after loading a checkpoint."""
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "centers"])


def save_model(model: keras.Model, path, meta: dict | None = None) -> None:
    """Atomically write `model` to `path` (.keras); `meta` goes into its metadata (a
    `ConvNeXt` describes itself; another model gets `weights_convert.sidecar_path`)."""
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


def embed_images(
    model: keras.Model, images: ImageSet, indices, batch_size=64, chunk=16, distribution=None
):
    """Embeddings (n, D) float32 of `images[indices]`, loaded `chunk` batches at a time and
    run by `embedding.model.predict_padded` (under `distribution`: full batches, split
    over its devices; over several processes, each runs its share of every batch and
    all gather the result)."""
    indices = np.asarray(indices)
    out = []
    step = batch_size * chunk
    _, processes = process_info(distribution)
    for start in range(0, len(indices), step):
        x = images.load(indices[start : start + step])
        for first in range(0, len(x), batch_size):
            batch = x[first : first + batch_size]
            if processes == 1:
                out.append(predict_padded(model, batch, batch_size, distribution))
                continue
            # every process runs its share of the batch, then all gather the whole
            mine = predict_padded(
                model, batch[process_share(len(batch), distribution)],
                batch_size // processes, distribution,
            )  # fmt: skip
            share = -(-len(batch) // processes)
            mine = np.concatenate([mine, np.zeros((share - len(mine), mine.shape[1]), mine.dtype)])
            out.append(gather_rows(mine, distribution, len(batch)))
    return np.concatenate(out) if out else np.zeros((0, model.output_shape[-1]), np.float32)


def evaluate(
    model,
    images: ImageSet,
    indices,
    batch_size=64,
    max_pairs=200_000,
    seed=0,
    distribution=None,
):
    """`embedding.verification_metrics` of all (or `max_pairs` sampled) pairs of
    `images[indices]`, scored by cosine similarity."""
    emb = embed_images(model, images, indices, batch_size, distribution=distribution)
    if not np.all(np.isfinite(emb)):
        raise FinetuneDataError(
            "The model gives NaN or infinite embeddings on the held-out images (a diverged "
            "run: lower the learning rate; or a broken checkpoint / normalisation)."
        )
    i, j, same = verification_pairs(images.identities[indices], max_pairs, seed)
    scores = np.sum(emb[i] * emb[j], axis=1)
    return verification_metrics(scores, same, folds=None)
