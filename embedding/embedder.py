"""`Embedder`: checkpoint-exact preprocessing + embedding model + verification.

    emb = Embedder("timm/convnext_atto.d2_in1k")
    vectors = emb.embed(["a.jpg", pil_image, uint8_array])   # (N, D) float32, unit norm
    result = emb.verify("a.jpg", "b.jpg")                     # similarity, threshold, verified

Images are decoded and resized in a thread pool while the model runs on the
previous batch. Batches have a fixed size (`batch_size`); a smaller last batch
is zero-padded to the next power of two (capped at `batch_size`), so a run
compiles at most log2(batch_size) + 1 input shapes, and a single image does not
cost a full batch.
"""

from __future__ import annotations

import collections
import math
import os
import pathlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

import weights_convert
from convnext_layers.dtypes import check_dtype
from embedding.errors import (
    ImageLoadError,
    NonFiniteError,
    without_traceback,
)
from embedding.faces import embed_faces
from embedding.gallery import cosine_similarity
from embedding.images import (  # as_input_list: re-exported, its old home
    DEFAULT_MAX_PIXELS,
    as_input_list,
    describe_input,
)
from embedding.metrics import (
    DEFAULT_THRESHOLD,
    Calibration,
    calibrate,
    check_threshold,
    verification_metrics,
)
from embedding.model import (
    DEFAULT_MODEL,
    build_model,
    embedding_dim,
    in_dtype,
    padded_size,
    predict_padded,
)
from embedding.preprocess import Preprocessor
from weights_convert.export import ExportError, export_model

ON_ERROR = ("raise", "skip")
# what a checkpoint's embedding is: timm's pre-logits features, or the network's own output
# (a face-recognition ConvNeXt's 512-d head); "auto" asks weights_convert.head_is_embedding
HEADS = ("auto", "pre_logits", "output")


@dataclass
class VerifyResult:
    similarity: float
    threshold: float
    verified: bool
    threshold_source: str  # "given", "calibrated" or "default"
    calibration: Calibration | None = None  # where a calibrated threshold came from

    def __bool__(self):
        return self.verified


@dataclass
class EmbedResult:
    """Outcome of `Embedder.embed_many`.

    `vectors[i]` is the embedding of `inputs[indices[i]]`; `failures` lists the
    inputs that could not be read (each an `ImageLoadError` with `.index`,
    `.name`, `.reason`).
    """

    vectors: np.ndarray
    indices: np.ndarray
    failures: list[ImageLoadError] = field(default_factory=list)

    @property
    def skipped(self) -> list[int]:
        return [f.index for f in self.failures]


class Embedder:
    """Preprocessing from the checkpoint's own `pretrained_cfg` + the embedding model.

    Args:
        source: Hub id, `.safetensors` file or checkpoint folder (see
            `embedding.build_model`). Ignored when `model` is given.
        model: an embedding `keras.Model` to use instead (e.g. from
            `build_model`); its `pretrained_cfg` attribute (or `pretrained_cfg`)
            sets the preprocessing.
        pooling, head_norm, cache, cache_dir: passed to `build_model`.
        head: what the embedding is: "pre_logits" (timm's pre-logits features:
            pooling, head norm; ImageNet checkpoints), "output" (the checkpoint's
            whole network, its classifier output: face-recognition ConvNeXts, whose
            `head.fc` is the 512-d face embedding), or "auto" (default: "output"
            where `weights_convert.head_is_embedding` says so: a classifier on the
            112x112 aligned face crop). L2-normalised either way.
        batch_size: images per model call.
        num_workers: decoding threads (default min(4, CPU count)).
        threshold: verification threshold; None uses `DEFAULT_THRESHOLD` until
            `calibrate` is called.
        use_test_size: preprocess at the checkpoint's `test_input_size` /
            `test_crop_pct` (timm's `use_test_size`; off by default, as in timm);
            the model takes any size.
        calibration: an `embedding.metrics.Calibration` (or its dict, or the path
            of its JSON file) whose threshold `verify` uses instead.
        channel_order: "rgb", or "bgr" for OpenCV arrays (numpy inputs only).
        data_format: layout of 3-D arrays: None (detect; ambiguous shapes are
            refused), "channels_last" (H, W, C) or "channels_first" (C, H, W).
        max_pixels: larger images are refused before decoding (a skippable
            `ImageLoadError`; default PIL's decompression-bomb limit; None: only
            PIL's own limit).
        progress: show a tqdm progress bar in `embed` (default off).
        dtype: "float32" (default) or "bfloat16": the model's body computes in
            bfloat16 (on CPUs with AVX512-BF16 / AMX about twice as fast), the
            normalisation statistics and the head with its L2 in float32; the
            embeddings are float32 either way (`embedding.model.in_dtype`). On a
            CPU without bfloat16 instructions the bfloat16 weights are computed
            in float32 arithmetic (bfloat16 arithmetic is emulated there, 2-3x
            slower than float32).
    """

    def __init__(
        self,
        source=DEFAULT_MODEL,
        *,
        model=None,
        pretrained_cfg=None,
        pooling: str = "avg",
        head_norm: bool = True,
        head: str = "auto",
        batch_size: int = 32,
        num_workers: int | None = None,
        threshold: float | None = None,
        use_test_size: bool = False,
        calibration=None,
        channel_order: str = "rgb",
        data_format: str | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        progress: bool = False,
        cache: bool = True,
        cache_dir=None,
        verbose: bool = False,
        dtype: str = "float32",
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        dtype = check_dtype(dtype) or "float32"
        if threshold is not None:
            threshold = check_threshold(threshold)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}; got {head!r}.")
        if model is None:
            model = build_model(
                source,
                pooling=pooling,
                head_norm=head_norm,
                cache=cache,
                cache_dir=cache_dir,
                verbose=verbose,
                dtype=dtype,
            )
            if _embeds_with_output(source, head, model):
                model = _output_head_model(source, head, pooling, head_norm, verbose)
        else:
            source = None
            model = in_dtype(model, dtype)
        self.model = model
        self.dtype = dtype
        self.source = source
        cfg = pretrained_cfg if pretrained_cfg is not None else getattr(model, "pretrained_cfg", {})
        self.pretrained_cfg = dict(cfg or {})
        self.preprocessor = Preprocessor(
            self.pretrained_cfg,
            use_test_size=use_test_size,
            max_pixels=max_pixels,
            data_format=data_format,
            channels=model.input_shape[-1],  # greyscale models get one channel, not three
        )
        model_hw = tuple(model.input_shape[1:3])
        if None not in model_hw and model_hw != self.preprocessor.config.input_size:
            raise ValueError(
                f"Model input {model_hw} differs from the preprocessing size "
                f"{self.preprocessor.config.input_size} of its pretrained_cfg."
            )
        self.batch_size = int(batch_size)
        self.num_workers = num_workers or min(4, os.cpu_count() or 1)
        self.threshold = check_threshold(threshold) if threshold is not None else None
        self.threshold_source = "given" if threshold is not None else "default"
        self.calibration = None
        if calibration is not None:
            if threshold is not None:
                raise ValueError("Give either threshold or calibration, not both.")
            self.use_calibration(calibration)
        self.channel_order = channel_order
        self.progress = progress

    def __repr__(self):
        return (
            f"Embedder({self.source or self.model.name!r}, dim={self.dim}, "
            f"input={self.preprocessor.config.input_size})"
        )

    @property
    def dim(self) -> int:
        return embedding_dim(self.model)

    # -- embedding ----------------------------------------------------------

    def preprocess(
        self,
        item,
        channel_order: str | None = None,
        data_format: str | None = None,
        *,
        index: int | None = None,
    ) -> np.ndarray:
        """One input -> the normalised (H, W, C) float32 array the model sees (C the
        model's input channels; `index`: its place in a batch, for the error message)."""
        return self.preprocessor(
            item, channel_order or self.channel_order, index, data_format=data_format
        )

    def _prepare(self, item, index, channel_order, data_format):
        try:
            return self.preprocessor(item, channel_order, index, data_format)
        except ImageLoadError as error:
            return without_traceback(error)  # kept for the report: must hold no frames

    def _batches(self, items, channel_order, data_format):
        """Yield (start, [array | ImageLoadError]) per batch, decoding ahead in threads."""
        n, bs = len(items), self.batch_size
        ahead = 2 * bs  # prefetch the next two batches
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="embed-io") as pool:
            pending = collections.deque()
            submitted = 0

            def top_up(limit):
                nonlocal submitted
                while submitted < min(n, limit):
                    pending.append(
                        pool.submit(
                            self._prepare, items[submitted], submitted, channel_order, data_format
                        )
                    )
                    submitted += 1

            try:
                for start in range(0, n, bs):
                    top_up(start + bs + ahead)
                    count = min(bs, n - start)
                    yield start, [pending.popleft().result() for _ in range(count)]
            finally:
                for future in pending:
                    future.cancel()

    def embed_many(
        self,
        inputs,
        *,
        channel_order: str | None = None,
        data_format: str | None = None,
        on_error: str = "skip",
        progress: bool | None = None,
    ) -> EmbedResult:
        """Embed inputs, keeping going past unreadable ones (`on_error="skip"`).

        Returns an `EmbedResult` (vectors of the good inputs, their indices, and
        the failures). `on_error="raise"` raises the first `ImageLoadError`.
        Every per-input failure (unreadable or missing file, decompression
        bomb, unsupported array, an object that is no image) is an
        `ImageLoadError` and is skipped; `inputs` that is no image or list at
        all raises `InputTypeError`, an empty list `EmptyInputError`.
        """
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        items = as_input_list(inputs)
        order = channel_order or self.channel_order
        show = self.progress if progress is None else progress
        vectors, indices, failures = [], [], []
        with tqdm(total=len(items), disable=not show, unit="img", desc="embed") as bar:
            for start, prepared in self._batches(items, order, data_format):
                good = []
                for offset, value in enumerate(prepared):
                    if isinstance(value, ImageLoadError):
                        if on_error == "raise":
                            raise value
                        failures.append(value)
                    else:
                        good.append((start + offset, value))
                if good:
                    output = self.embed_arrays(np.stack([array for _, array in good]))
                    _check_finite(output, [i for i, _ in good], items)
                    vectors.append(output)
                    indices.extend(i for i, _ in good)
                bar.update(len(prepared))
        vectors = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), dtype=np.float32)
        return EmbedResult(vectors, np.asarray(indices, dtype=np.int64), failures)

    def embed(
        self,
        inputs,
        *,
        channel_order: str | None = None,
        data_format: str | None = None,
        on_error: str = "raise",
        progress: bool | None = None,
    ) -> np.ndarray:
        """(N, D) float32 embeddings (unit norm by default), one row per input.

        `inputs`: one image or a list of them (paths, `pathlib.Path`, bytes, PIL
        images, HWC numpy arrays), or an (N, H, W, C) array. An unreadable input
        raises `ImageLoadError` naming it; with `on_error="skip"` it is left out
        with a warning (use `embed_many` to get the skipped indices). None, a
        number or an empty list raise `InputTypeError` / `EmptyInputError`.
        """
        result = self.embed_many(
            inputs,
            channel_order=channel_order,
            data_format=data_format,
            on_error=on_error,
            progress=progress,
        )
        if result.failures:
            names = "; ".join(str(f) for f in result.failures[:5])
            warnings.warn(
                f"Skipped {len(result.failures)} unreadable input(s): {names}", stacklevel=2
            )
        return result.vectors

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, C) arrays as `preprocess` makes them, N <= `batch_size` -> (N, D)
        float32: one model call, zero-padded to `embedding.model.padded_size(N)`."""
        return predict_padded(self.model, batch, self.batch_size)

    def warm_up(self) -> list[int]:
        """Run the model once at 1, 2, 4, ..., `batch_size` images: every batch size
        `embed_arrays` pads to where the backend compiles per batch size (JAX's jit), so
        that no later call compiles; elsewhere the first trace (TensorFlow, one for every
        batch size) and the kernels' first runs. A service calls it before it reports
        ready. Returns the sizes."""
        bs = self.batch_size
        sizes = sorted({padded_size(n, bs, compiles_per_size=True) for n in range(1, bs + 1)})
        for size in sizes:
            self.embed_arrays(np.zeros((size, *self.preprocessor.input_shape), np.float32))
        return sizes

    def embed_one(self, item, channel_order: str | None = None) -> np.ndarray:
        """(D,) embedding of a single image."""
        return self.embed([item], channel_order=channel_order)[0]

    # -- verification -------------------------------------------------------

    def similarity(self, a, b) -> float:
        """Cosine similarity of two images (or precomputed embedding vectors)."""
        va, vb = self._as_vector(a, "first input"), self._as_vector(b, "second input")
        score = float(cosine_similarity(va, vb))
        if not math.isfinite(score):  # e.g. an all-infinite vector
            raise NonFiniteError(f"the similarity of the two inputs is {score}, not a number")
        return score

    def _as_vector(self, x, name="input"):
        if isinstance(x, np.ndarray) and x.ndim == 1:
            if not np.all(np.isfinite(x)):
                raise NonFiniteError(f"{name}: the embedding vector contains NaN or infinity")
            return x
        return self.embed_one(x)

    def verify(self, a, b, threshold: float | None = None) -> VerifyResult:
        """Same identity? `similarity >= threshold`.

        Threshold: the argument, else the calibrated / constructor one, else
        `DEFAULT_THRESHOLD` (0.5, uncalibrated; `threshold_source="default"`).
        """
        calibration = None
        if threshold is not None:
            used, source = check_threshold(threshold), "given"
        elif self.threshold is not None:
            used, source = float(self.threshold), self.threshold_source
            calibration = self.calibration
        else:
            used, source = DEFAULT_THRESHOLD, "default"
        score = self.similarity(a, b)  # NaN/Inf embeddings are refused (ValueError)
        return VerifyResult(score, used, bool(score >= used), source, calibration)

    def use_calibration(self, calibration) -> Calibration:
        """Take `verify`'s threshold from a `Calibration` (or its dict, or a JSON file)."""
        if isinstance(calibration, dict):
            calibration = Calibration.from_dict(calibration)
        elif isinstance(calibration, (str, os.PathLike)):
            calibration = Calibration.load(calibration)
        elif not isinstance(calibration, Calibration):
            raise TypeError(
                "calibration must be a Calibration, its dict or a JSON file path; got "
                f"{type(calibration).__name__}."
            )
        own = str(self.source) if self.source is not None else None
        if calibration.model is not None and own is not None and calibration.model != own:
            warnings.warn(
                f"The calibration was made with model {calibration.model!r}, this embedder "
                f"uses {own!r}: its threshold may not mean the same here.",
                stacklevel=2,
            )
        self.calibration = calibration
        self.threshold = calibration.threshold
        self.threshold_source = "calibrated"
        return calibration

    def calibrate(self, scores, labels, criterion: str = "eer", *, target_far=None, **options):
        """Set `threshold` from labelled pair scores.

        With `target_far` (e.g. 1e-3): the threshold whose false-accept rate on
        these pairs is at most the target (`embedding.metrics.calibrate`,
        `options` are its `n_bootstrap`, `confidence`, `seed`); returns the
        `Calibration`, kept as `self.calibration`. Without: criterion "eer" (the
        equal-error-rate threshold) or "accuracy" (the best-accuracy threshold);
        returns the `VerificationMetrics`.
        """
        if target_far is not None:
            model = str(self.source) if self.source is not None else None
            return self.use_calibration(
                calibrate(scores, labels, target_far, model=model, **options)
            )
        if options:
            raise TypeError(f"{', '.join(options)}: only with target_far.")
        metrics = verification_metrics(scores, labels, folds=None)
        if criterion == "eer":
            self.threshold = metrics.eer_threshold
        elif criterion == "accuracy":
            self.threshold = metrics.best_threshold
        else:
            raise ValueError(f"criterion must be 'eer' or 'accuracy', got {criterion!r}.")
        self.threshold_source = "calibrated"
        self.calibration = None
        return metrics

    def pair_scores(self, pairs, *, progress: bool | None = None, on_error: str = "raise"):
        """Cosine similarity of each (a, b) pair; every distinct image embedded once.

        Returns (scores (P,), valid (P,) bool, failures): with `on_error="skip"`,
        pairs with an unreadable image get NaN and valid False.
        """
        keys, index = [], {}
        for a, b in pairs:
            for item in (a, b):
                key = os.fspath(item) if isinstance(item, (str, pathlib.PurePath)) else id(item)
                if key not in index:
                    index[key] = len(keys)
                    keys.append(item)
        result = self.embed_many(keys, on_error=on_error, progress=progress)
        table = np.full((len(keys), self.dim), np.nan, dtype=np.float32)
        table[result.indices] = result.vectors
        scores = []
        for a, b in pairs:
            ka = os.fspath(a) if isinstance(a, (str, pathlib.PurePath)) else id(a)
            kb = os.fspath(b) if isinstance(b, (str, pathlib.PurePath)) else id(b)
            va, vb = table[index[ka]], table[index[kb]]
            bad = np.isnan(va).any() or np.isnan(vb).any()
            scores.append(np.nan if bad else cosine_similarity(va, vb))
        scores = np.asarray(scores, dtype=np.float64)
        return scores, ~np.isnan(scores), result.failures

    # -- faces (embedding.faces) --------------------------------------------

    def embed_faces(self, frame, detector=None, boxes=None, landmarks=None, **options):
        """Detect (or take `boxes`), align or crop, and embed every face of `frame`.

        Returns a list of `embedding.faces.Face` (box, score, landmarks, unit embedding). See
        `embedding.faces.embed_faces` for the options: align, margin, flip, policy, min_size,
        box_format, channel_order.
        """
        return embed_faces(self, frame, detector, boxes, landmarks, **options)

    # -- deployment -----------------------------------------------------------

    def export(self, path, **options) -> dict:
        """Export the embedding model to ONNX / LiteRT / SavedModel / OpenVINO with a
        sidecar JSON holding this embedder's preprocessing and its threshold (when one
        was given or calibrated); see `weights_convert.export_model` for `options`
        (format, dtype, batch_size, input_size, dynamic_size, with_normalization,
        input_dtype). Returns the sidecar's content. A bfloat16 embedder is refused:
        the exporters' runtimes (onnxruntime, LiteRT) have few bfloat16 kernels;
        export a float32 one (LiteRT's dtype="float16" halves the weights)."""
        if self.dtype != "float32":
            raise ExportError(
                f"This Embedder computes in {self.dtype}; export a float32 one "
                "(Embedder(..., dtype='float32')), or for half-precision weights LiteRT's "
                "dtype='float16'."
            )
        options.setdefault("pretrained_cfg", self.pretrained_cfg)
        options.setdefault("threshold", self.threshold)
        return export_model(self.model, path, **options)


def _embeds_with_output(source, head, pre_logits_model) -> bool:
    """Whether `head` asks for the checkpoint's own output rather than the pre-logits
    model `build_model` made of it (whose pretrained_cfg still holds the checkpoint's
    classifier size). `.keras` models keep their own head."""
    if head == "pre_logits":
        return False
    if os.fspath(source).endswith(".keras"):
        if head == "output":
            raise ValueError(f"head='output': {source} is a .keras model, whose head is its own.")
        return False
    if head == "output":
        return True
    cfg = getattr(pre_logits_model, "pretrained_cfg", None) or {}
    return weights_convert.head_is_embedding(
        {"pretrained_cfg": cfg, "num_classes": cfg.get("num_classes")}
    )


def _output_head_model(source, head, pooling, head_norm, verbose):
    """The checkpoint's whole network, its output L2-normalised (`head` "output" or an
    "auto" that `_embeds_with_output` resolved so)."""
    state_dict, info = weights_convert.load_checkpoint(source)
    if not info["num_classes"]:
        raise ValueError(f"head='output': {source} has no classifier (use head='pre_logits').")
    if pooling != "avg" or not head_norm:
        raise ValueError(
            f"{source}: its head is the embedding (head={head!r}), run as timm runs it; "
            "pooling / head_norm choose among pre-logits features (pass head='pre_logits')."
        )
    name = f"{info['architecture']}_embedding"

    def build():
        return weights_convert.keras_model_for(info, normalize=True, name=name)

    return weights_convert.build_ported(build, state_dict, progress=verbose)


def _check_finite(vectors: np.ndarray, indices, items) -> None:
    """Refuse NaN / infinite embeddings (a broken checkpoint or normalisation): a
    NaN vector would score NaN against everything and never give a verdict."""
    bad = ~np.all(np.isfinite(vectors), axis=1)
    if bad.any():
        first = indices[int(np.flatnonzero(bad)[0])]
        raise NonFiniteError(
            f"the model produced NaN or infinite embeddings for {int(bad.sum())} input(s), "
            f"first input #{first} ({describe_input(items[first])}); check the checkpoint "
            "and its mean / std"
        )
