"""`OnnxEmbedder`: an exported `.onnx` embedding model run by onnxruntime, fed by the
preprocessing its sidecar JSON records, with no Keras, backend, timm or torch loaded.

    from embedding.onnx_embedder import OnnxEmbedder
    emb = OnnxEmbedder("embedder.onnx")      # reads embedder.onnx.json beside it
    vectors = emb.embed(["a.jpg", "b.jpg"])   # (N, D) float32, unit norm

It answers the part of `Embedder`'s interface that serving and the face pipeline use
(`preprocessor`, `preprocess`, `embed_arrays`, `embed`, `warm_up`, `dim`, `threshold`,
`channel_order`, `batch_size`, `source`, `pretrained_cfg`), so `python -m embedding serve
--model embedder.onnx` runs where only numpy, PIL and onnxruntime are installed. The
sidecar (`weights_convert.export`) says how the file wants its input: `(x / 255 - mean)
/ std` (the default export), or resized and cropped RGB pixels in [0, 1] (float32) or
0..255 (uint8) when the normalisation is inside the graph; a fixed batch size is
honoured by padding. Outputs that are not L2-normalised yet ("features") are
normalised here; a classifier's logits are refused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from embedding.batching import check_finite_rows
from embedding.errors import ModelSourceError
from embedding.gallery.vectors import l2_normalize
from embedding.images import DEFAULT_MAX_PIXELS, as_input_list
from embedding.metrics import check_threshold
from embedding.preprocess import Preprocessor
from weights_convert.export import SIDECAR_KIND, export_sidecar_path

ONNX_EXTRA = 'pip install "keras-convnext[serve]" (onnxruntime)'


def read_sidecar(path) -> dict:
    """The sidecar JSON of the export `path` (`PATH.json`), checked for what running the
    file needs; `ModelSourceError` naming the problem otherwise."""
    sidecar_path = export_sidecar_path(path, "onnx")
    try:
        with open(sidecar_path, encoding="utf-8") as file:
            sidecar = json.load(file)
    except FileNotFoundError:
        raise ModelSourceError(
            os.fspath(path),
            f"no sidecar {sidecar_path} beside it (export with `python -m embedding export`, "
            "which writes the preprocessing there)",
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = f"unreadable sidecar {sidecar_path}: {error}"
        raise ModelSourceError(os.fspath(path), reason) from None
    if not isinstance(sidecar, dict) or sidecar.get("kind") != SIDECAR_KIND:
        raise ModelSourceError(
            os.fspath(path), f"{sidecar_path} is not a keras-convnext export sidecar"
        )
    for key in ("input", "preprocessing", "outputs"):
        if not isinstance(sidecar.get(key), (dict, list)) or not sidecar[key]:
            raise ModelSourceError(os.fspath(path), f"{sidecar_path} has no {key!r}")
    kind = sidecar["outputs"][0].get("kind")
    if kind not in ("embedding", "features"):
        raise ModelSourceError(
            os.fspath(path),
            f"the export's output is {kind!r}, not an embedding: export the embedding model "
            "(`python -m embedding export`)",
        )
    return sidecar


def _import_onnxruntime():
    # onnxruntime: the `serve` / `export` extras, needed only for .onnx models
    try:
        import onnxruntime
    except ImportError as error:
        reason = f"running .onnx files needs onnxruntime: {ONNX_EXTRA}"
        raise ModelSourceError("onnx", reason) from error
    return onnxruntime


class OnnxEmbedder:
    """An exported embedding model (`.onnx` + its sidecar) run by onnxruntime.

    Args:
        path: the `.onnx` file; its sidecar `PATH.json` must be beside it.
        batch_size: most images per `embed_arrays` call.
        threshold: verification threshold (default: the sidecar's calibrated one, else
            None: `DEFAULT_THRESHOLD` applies).
        max_pixels: larger images are refused before decoding.
        channel_order: "rgb", or "bgr" for OpenCV arrays.
        threads: onnxruntime's intra-op threads (default: its own choice).
    """

    def __init__(
        self,
        path,
        *,
        batch_size: int = 32,
        threshold: float | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        channel_order: str = "rgb",
        threads: int | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        self.source = os.fspath(path)
        if not os.path.isfile(self.source):
            raise ModelSourceError(self.source, "no such .onnx file")
        sidecar = read_sidecar(self.source)
        self.sidecar = sidecar
        self.pretrained_cfg = dict(sidecar.get("pretrained_cfg") or {})
        preprocessing = sidecar["preprocessing"]
        self.preprocessor = Preprocessor(preprocessing, max_pixels=max_pixels)
        self.normalization_in_graph = bool(preprocessing.get("normalization_in_graph"))
        self.input_dtype = np.dtype(sidecar["input"].get("dtype") or "float32")
        shape = sidecar["input"].get("shape") or [None]
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.batch_size = int(batch_size)
        self.channel_order = channel_order
        output = sidecar["outputs"][0]
        self.l2_normalized = bool(output.get("l2_normalized"))
        given = threshold if threshold is not None else sidecar.get("threshold")
        self.threshold = check_threshold(given) if given is not None else None
        self.threshold_source = (
            "default"
            if self.threshold is None
            else ("given" if threshold is not None else "calibrated")
        )
        self.calibration = sidecar.get("calibration")
        onnxruntime = _import_onnxruntime()
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = onnxruntime.InferenceSession(
                self.source, options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's own error types: a damaged or foreign file
            raise ModelSourceError(self.source, f"onnxruntime cannot load it: {error}") from None
        self._input_name = self.session.get_inputs()[0].name
        self._dim = output.get("dim") or self.session.get_outputs()[0].shape[-1]

    def __repr__(self):
        size = self.preprocessor.config.input_size
        return f"OnnxEmbedder({self.source!r}, dim={self.dim}, input={size})"

    @property
    def dim(self) -> int:
        return int(self._dim)

    def preprocess(
        self,
        item,
        channel_order: str | None = None,
        data_format: str | None = None,
        *,
        index: int | None = None,
    ) -> np.ndarray:
        """One input -> the (H, W, 3) array the file takes (see the module doc)."""
        order = channel_order or self.channel_order
        image = self.preprocessor.load(item, order, index, data_format)
        pixels = self.preprocessor.resize_crop(image)  # 0..255
        if not self.normalization_in_graph:
            return np.ascontiguousarray(self.preprocessor.normalize(pixels), dtype=np.float32)
        if self.input_dtype == np.uint8:
            return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
        return (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)

    def embed_arrays(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) arrays as `preprocess` makes them -> (N, D) float32 unit vectors."""
        batch = np.asarray(batch, dtype=self.input_dtype)
        n = batch.shape[0]
        step = self.fixed_batch or max(n, 1)
        outputs = []
        for start in range(0, n, step):
            part = batch[start : start + step]
            if self.fixed_batch and part.shape[0] < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - part.shape[0], *part.shape[1:]), part.dtype)
                part = np.concatenate([part, pad])
            result = self.session.run(None, {self._input_name: part})[0]
            outputs.append(np.asarray(result, dtype=np.float32)[: min(step, n - start)])
        vectors = np.concatenate(outputs) if outputs else np.zeros((0, self.dim), np.float32)
        return vectors if self.l2_normalized else l2_normalize(vectors)

    def warm_up(self) -> list[int]:
        """Run the file once at batch 1 and at `batch_size` (onnxruntime plans its memory
        on the first run of a shape); returns the sizes."""
        sizes = sorted({1, self.fixed_batch or self.batch_size})
        for size in sizes:
            shape = (size, *self.preprocessor.input_shape)
            self.embed_arrays(np.zeros(shape, dtype=self.input_dtype))
        return sizes

    def embed(self, inputs, *, channel_order: str | None = None) -> np.ndarray:
        """(N, D) float32 unit embeddings, one row per input (any input `Embedder.embed`
        takes); an unreadable input raises `ImageLoadError` naming it."""
        items = as_input_list(inputs)
        arrays = [
            self.preprocess(item, channel_order, index=index) for index, item in enumerate(items)
        ]
        vectors = [
            self.embed_arrays(np.stack(arrays[start : start + self.batch_size]))
            for start in range(0, len(arrays), self.batch_size)
        ]
        return check_finite_rows(np.concatenate(vectors), items)
