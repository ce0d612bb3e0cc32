"""Images to L2-normalised ConvNeXt embeddings, cosine verification and its metrics.

    from embedding import build_model, compute_embedding, Embedder, verification_metrics

Names are imported lazily, so `python -m embedding --help` (and the pure-numpy
parts: metrics, gallery, preprocessing) do not load Keras or a backend.

The package, library below and interfaces above (no library module imports an
interface):
- library, numpy / PIL only: `errors`, `files` (which files are images, their labels),
  `npz` (.npz files without pickle), `parquet` (Parquet embedding files; pyarrow when
  used), `formats` (which format an output name asks for; reading any embedding file),
  `job_files` (an embedding job's identity, chunks and outputs), `preprocess` (timm's
  eval transform), `pairs`
  (verification pairs files), `metrics/` (verification, calibration, identification),
  `gallery/` (1:N search: indexes, files), `runs` (what identifies a run), `batching`
  (dynamic batching of concurrent requests), `onnx_embedder` (an exported `.onnx` model
  run by onnxruntime, no Keras);
- library with Keras: `model` (embedding models, the converted-model cache, batches),
  `embedder` (`Embedder`), `faces/` (geometry, detectors, pipeline, enrolment),
  `arcface`, `distribution` (devices and processes), `jobs` (resumable, sharded
  embedding), `raydata` (the same jobs on Ray Data; Ray and Keras when used), `finetune/`;
- interfaces: `cli/` (`python -m embedding`, one module per subcommand), `serve/` (the
  HTTP service, `python -m embedding serve`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # model (imports Keras)
    "build_model": "embedding.model",
    "compute_embedding": "embedding.model",
    "embedding_dim": "embedding.model",
    "GeneralizedMeanPooling": "embedding.model",
    "ModelCache": "embedding.model",
    "ModelUnavailableError": "embedding.model",
    "DEFAULT_MODEL": "embedding.model",
    "ArcFace": "embedding.arcface",
    "Embedder": "embedding.embedder",
    "EmbedResult": "embedding.embedder",
    "VerifyResult": "embedding.embedder",
    "DEFAULT_THRESHOLD": "embedding.metrics",
    "FinetuneConfig": "embedding.finetune",
    # numpy / PIL only (onnxruntime for OnnxEmbedder)
    "OnnxEmbedder": "embedding.onnx_embedder",
    "DynamicBatcher": "embedding.batching",
    "BatchedEmbedder": "embedding.batching",
    "InputError": "embedding.errors",
    "InputTypeError": "embedding.errors",
    "EmptyInputError": "embedding.errors",
    "UnsupportedInputError": "embedding.errors",
    "NonFiniteError": "embedding.errors",
    "OutputPathError": "embedding.errors",
    "PairsFileError": "embedding.errors",
    "ModelSourceError": "embedding.errors",
    "FinetuneDataError": "embedding.errors",
    "FinetuneConfigError": "embedding.errors",
    "ResumeMismatchError": "embedding.errors",
    "find_image_files": "embedding.files",
    "Preprocessor": "embedding.preprocess",
    "PreprocessConfig": "embedding.preprocess",
    "ImageLoadError": "embedding.errors",
    "TooManyPixelsError": "embedding.errors",
    "load_image": "embedding.images",
    "cosine_similarity": "embedding.gallery",
    "l2_normalize": "embedding.gallery",
    "Gallery": "embedding.gallery",
    "GalleryFileError": "embedding.gallery",
    "INDEX_TYPES": "embedding.gallery",
    "verification_metrics": "embedding.metrics",
    "VerificationMetrics": "embedding.metrics",
    "roc_curve": "embedding.metrics",
    "roc_auc": "embedding.metrics",
    "eer": "embedding.metrics",
    "tar_at_far": "embedding.metrics",
    "best_accuracy_threshold": "embedding.metrics",
    "kfold_accuracy": "embedding.metrics",
    "calibrate": "embedding.metrics",
    "Calibration": "embedding.metrics",
    "CalibrationError": "embedding.metrics",
    "identification_metrics": "embedding.metrics",
    "IdentificationMetrics": "embedding.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embedding' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
