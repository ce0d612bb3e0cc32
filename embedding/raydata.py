"""Embedding on Ray Data: images decoded and preprocessed in Ray tasks, the model in a
pool of actors (built once per actor), any number of machines.

    import ray
    from embedding.raydata import embed_dataset

    ds = ray.data.read_binary_files("s3://bucket/images/", include_paths=True)
    vectors = embed_dataset(ds, "timm/convnext_atto.d2_in1k", column="bytes", actors=4)
    vectors.write_parquet("s3://bucket/embeddings/")   # path, embedding, error columns

    python -m embedding embed images/ -o vectors/ --engine ray --address auto --actors 4

`embed_dataset` adds two steps to a dataset: `preprocess_batch` (Ray tasks: decode each
image and apply the checkpoint's own `embedding.Preprocessor`, exactly as the
single-process `embed`; a failure becomes the row's `error`) and `EmbedBatches` (the
callable class `map_batches` runs on an actor pool: the model is built once per
actor from the driver's model, shipped through Ray's object store, so every actor
holds exactly the weights the driver hashed; batches in, embeddings out by
`embedding.model.predict_padded`). The output keeps the input's columns (the image
column too when it holds paths), plus `embedding` (fixed-size list of float32, null for
an unreadable image) and `error` (null for a readable one).

`embed_folder_job` is the command line's job: the same file list, chunks, identity and
output folder of Parquet parts as `embedding.jobs.embed_files` into a folder, so a rerun
does only the missing parts (and a run of either engine resumes the other's). Ray
retries the batches of an actor that dies (a killed process, out of memory) on a
replacement; the driver writes each part once, when every file of its chunk is there,
keeping one row per file whatever Ray delivers twice, so every image is in the output
exactly once.

Ray (the `ray` extra) and Keras are imported inside the functions that need them: the
actors choose the Keras backend before Keras loads, and the package imports without Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from embedding.errors import ImageLoadError, InputError, MissingExtraError, without_traceback
from embedding.files import folder_label, is_image_name
from embedding.job_files import (
    CHUNK_SIZE,
    FolderJob,
    JobError,
    JobResult,
    folder_labels,
    int_setting,
    job_identity,
    model_record,
    shard_chunks,
)
from embedding.parquet import arrow

RAY_EXTRA = 'pip install "keras-convnext[ray]" (ray[data], pyarrow, fsspec)'
PIXELS = "__pixels"  # the preprocessed images between the two steps (dropped after)


def _ray():
    try:  # optional dependency: the ray extra
        import ray
        import ray.data
    except ImportError as error:
        raise MissingExtraError(f"The Ray engine needs Ray Data: {RAY_EXTRA}.") from error
    return ray


@contextlib.contextmanager
def connect(address=None, **init_options):
    """Join the Ray cluster at `address` (None: $RAY_ADDRESS, else a new local cluster),
    unless this process is connected already; leave what it joined at the end."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, **init_options)
    try:
        yield ray
    finally:
        ray.shutdown()


def is_url(path) -> bool:
    """Whether a path names a file through fsspec (`s3://`, `gs://`, `file://`, ...)."""
    return isinstance(path, str) and "://" in path


# ----------------------------------------------------------------------------
# The two steps: preprocessing tasks, model actors
# ----------------------------------------------------------------------------


def _read_url(path) -> bytes:
    import fsspec  # optional dependency: the ray extra

    with fsspec.open(path, "rb") as f:
        return f.read()


def _prepared(preprocessor, item):
    """(pixels, None) or (None, reason) for one image (a path, URL, bytes or array)."""
    try:
        if is_url(item):
            try:
                item = _read_url(item)
            except (OSError, ValueError) as error:
                return None, f"cannot read the file ({error or type(error).__name__})"
        return preprocessor(item), None
    except ImageLoadError as error:
        return None, without_traceback(error).reason


def preprocess_batch(batch: dict, *, column: str, preprocessor) -> dict:
    """A batch (column -> array) with `column`'s images preprocessed by `preprocessor`
    (an `embedding.Preprocessor`): the pixels in `PIXELS` (zeros for a failure), `error`
    (the reason, or "": a str column, which Ray keeps as it is where it would turn a None
    into NaN). `column` is kept when it holds paths, dropped otherwise."""
    items = batch[column]
    shape = preprocessor.input_shape
    pixels = np.zeros((len(items), *shape), np.float32)
    errors = []
    for k, item in enumerate(items):
        image, error = _prepared(preprocessor, item)
        errors.append(error or "")
        if image is not None:
            pixels[k] = image
    out = {
        name: values
        for name, values in batch.items()
        if name != column or all(isinstance(v, str) for v in values)
    }
    out[PIXELS] = pixels
    out["error"] = np.asarray(errors, dtype=str)
    return out


class EmbedBatches:
    """The callable class of the actor pool: the model built once, batches of
    preprocessed images in, embeddings out (a pyarrow Table: the batch's columns,
    `embedding` as a fixed-size list of float32 with nulls, `error`).

    `model_files`: {file name: bytes} of the model saved by
    `weights_convert.save_converted` (a .keras file and any sidecar), or an object
    reference to it; `backend`: the Keras backend to load it with, chosen here before
    Keras is imported.
    """

    def __init__(self, model_files, batch_size: int, backend: str):
        ray = _ray()
        if isinstance(model_files, ray.ObjectRef):  # not resolved inside constructor kwargs
            model_files = ray.get(model_files)
        os.environ["KERAS_BACKEND"] = backend
        import keras  # Keras loads here, after the backend is chosen

        import weights_convert  # loads Keras: after the backend is chosen

        if keras.backend.backend() != backend:
            raise RuntimeError(
                f"this Ray worker runs Keras on {keras.backend.backend()}, not {backend}"
            )
        folder = tempfile.mkdtemp(prefix="embed-actor-")
        try:
            for name, data in model_files.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            keras_file = next(n for n in model_files if n.endswith(".keras"))
            self.model = weights_convert.load_converted(os.path.join(folder, keras_file))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.batch_size = int(batch_size)

    def __call__(self, batch: dict):
        from embedding.model import embedding_dim, predict_padded  # Keras: loaded by __init__

        pa, _ = arrow()
        pixels = batch[PIXELS]
        errors = [str(error) for error in batch["error"]]
        good = [k for k, error in enumerate(errors) if not error]
        dim = embedding_dim(self.model)
        vectors = np.zeros((len(errors), dim), np.float32)
        for start in range(0, len(good), self.batch_size):
            rows = good[start : start + self.batch_size]
            vectors[rows] = predict_padded(self.model, pixels[rows], self.batch_size)
        readable = np.zeros(len(errors), bool)
        readable[good] = True
        columns = {name: _arrow_column(pa, values) for name, values in batch.items()
                   if name not in (PIXELS, "error")}  # fmt: skip
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.reshape(-1), pa.float32()), dim, mask=pa.array(~readable)
        )
        columns["error"] = pa.array([e or None for e in errors], pa.string())
        return pa.table(columns)


def _arrow_column(pa, values):
    """A batch column (numpy) as an Arrow array: scalars as they are, tensors as Ray's
    tensor extension type."""
    values = np.asarray(values)
    if values.ndim > 1:
        from ray.data.extensions import ArrowTensorArray  # optional dependency: ray

        return ArrowTensorArray.from_numpy(values)
    if values.dtype == object:
        return pa.array(values.tolist())
    return pa.array(values)


def model_files(model) -> dict:
    """{file name: bytes} of `model` saved as this project saves models (for the actors)."""
    import weights_convert  # loads Keras (already loaded: `model` is a Keras model)

    folder = tempfile.mkdtemp(prefix="embed-model-")
    try:
        weights_convert.save_converted(model, os.path.join(folder, "model.keras"))
        files = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
        return files
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def embed_dataset(
    ds,
    model,
    *,
    column: str = "image",
    batch_size: int = 32,
    actors: int | None = None,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    num_cpus_per_task: float = 1,
    **embedder_options,
):
    """`ds` (a `ray.data.Dataset`) with every image of `column` embedded: the dataset
    that does it, lazily (see the module docstring for its columns).

    Args:
        ds: a dataset whose `column` holds images: paths (local on every node, or URLs
            fsspec reads), encoded bytes (`ray.data.read_binary_files`), or arrays
            (`ray.data.read_images`; decoded by Ray, so not bit-equal to the files).
        model: an `embedding.Embedder`, or a model source for one (Hub id, checkpoint
            file or folder, .keras file; `embedder_options` are its options: pooling,
            head_norm, cache, cache_dir, max_pixels, use_test_size). It is built here,
            once, and shipped to the actors through the object store.
        batch_size: images per model call (and per preprocessing batch).
        actors: a fixed pool of this many model actors; None: from 1 up to what the
            cluster's resources allow.
        num_gpus_per_actor, num_cpus_per_actor: each actor's resources (a GPU actor:
            `num_gpus_per_actor=1`). num_cpus_per_task: each preprocessing task's.
    """
    ray = _ray()
    arrow()
    batch_size = int_setting("batch_size", batch_size, 1)
    if actors is not None:
        actors = int_setting("actors", actors, 1)
    if actors is not None:
        _check_resources(ray, actors, num_cpus_per_actor, num_gpus_per_actor, num_cpus_per_task)
    embedder = _embedder(model, batch_size, embedder_options)
    import keras  # already loaded by the embedder: its backend goes to the actors

    files = ray.put(model_files(embedder.model))
    prepared = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"column": column, "preprocessor": embedder.preprocessor},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus_per_task,
    )
    pool = (
        ray.data.ActorPoolStrategy(size=actors)
        if actors is not None
        else ray.data.ActorPoolStrategy(min_size=1)
    )
    backend = keras.backend.backend()
    return prepared.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"model_files": files, "batch_size": batch_size, "backend": backend},
        batch_size=batch_size,
        batch_format="numpy",
        compute=pool,
        num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor,
        runtime_env={"env_vars": {"KERAS_BACKEND": backend}},
    )


def _check_resources(ray, actors, cpus_per_actor, gpus_per_actor, cpus_per_task) -> None:
    """A JobError when `actors` actors would leave no CPU for the preprocessing tasks (or
    need more GPUs than the cluster has): Ray would wait for them forever."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if actors * cpus_per_actor + cpus_per_task > cpus:
        raise JobError(
            f"{actors} actor(s) of {cpus_per_actor:g} CPU leave less than {cpus_per_task:g} "
            f"CPU for decoding on this cluster of {cpus:g} CPUs, and Ray would wait forever; "
            "pass fewer actors (--actors) or a fraction of a CPU per actor (--cpus-per-actor "
            "0.5: the model still uses every core of its node)"
        )
    if actors * gpus_per_actor > gpus:
        raise JobError(
            f"{actors} actor(s) of {gpus_per_actor:g} GPU need more than the cluster's "
            f"{gpus:g} GPUs; pass fewer actors (--actors) or --gpus-per-actor"
        )


def _embedder(model, batch_size, options):
    from embedding.embedder import Embedder  # Keras loads here (the driver's backend)

    if isinstance(model, Embedder):
        if options:
            raise TypeError(f"{', '.join(options)}: only with a model source, not an Embedder.")
        return model
    return Embedder(model, batch_size=batch_size, **options)


# ----------------------------------------------------------------------------
# Listing files (local or fsspec)
# ----------------------------------------------------------------------------


def find_images(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(paths, labels) of the images of `inputs`: local files and folders as
    `embedding.files.find_image_files` finds them, URLs through fsspec by the same rules
    (a folder's images by their top-level sub-folder, sorted; a file by its folder)."""
    from embedding.files import find_image_files  # the one rule for local files

    paths, labels = [], []
    for item in inputs:
        if not is_url(item):
            found = find_image_files([item])
            paths += [f.path for f in found]
            labels += [f.label for f in found]
            continue
        import fsspec  # optional dependency: the ray extra

        fs, root = fsspec.core.url_to_fs(item)
        protocol = item.split("://", 1)[0]
        if fs.isdir(root):
            found = [
                os.path.relpath(p, root).split("/")
                for p in fs.find(root)
                if is_image_name(os.path.basename(p))
            ]
            # os.walk's order (a folder's files, then its sub-folders, each sorted) and its
            # rule (no hidden folders), so a URL lists a folder as its local path does
            found = [r for r in found if not any(part.startswith(".") for part in r[:-1])]
            found.sort(key=lambda r: [(1, part) for part in r[:-1]] + [(0, r[-1])])
            for relative in found:
                paths.append(f"{protocol}://{root.rstrip('/')}/{'/'.join(relative)}")
                labels.append(relative[0] if len(relative) > 1 else os.path.basename(root))
        elif fs.isfile(root):
            paths.append(item)
            labels.append(folder_label(root))
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return paths, labels


# ----------------------------------------------------------------------------
# The command line's job: a folder of parts
# ----------------------------------------------------------------------------


def embed_folder_job(
    embedder,
    paths: Sequence[str],
    output,
    *,
    labels: Sequence[str] | None = None,
    chunk_size: int = CHUNK_SIZE,
    actors: int | None = None,
    num_gpus_per_actor: float = 0,
    num_cpus_per_actor: float = 1,
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Embed `paths` into the folder of Parquet parts `output` on the Ray cluster this
    process is connected to (`ray.init` first); resumable, the same output as
    `embedding.jobs.embed_files(embedder, paths, output)` (module docstring)."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise JobError("no image files to embed (the list of paths is empty)")
    labels = folder_labels(paths) if labels is None else list(labels)
    if len(labels) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
    chunk_size = int_setting("chunk_size", chunk_size, 1)
    log = log or (lambda message: None)
    identity = job_identity(embedder, paths, chunk_size, 0, 1)
    job = FolderJob(paths, labels, output, identity, model_record(embedder, identity), log)

    def embed_missing(missing, write):
        pa, _ = arrow()
        blocks = [
            pa.table({"index": np.arange(start, stop, dtype=np.int64), "path": paths[start:stop]})
            for _, start, stop in missing
        ]
        ds = _ray().data.from_arrow(blocks)
        out = embed_dataset(
            ds, embedder, column="path", batch_size=embedder.batch_size, actors=actors,
            num_gpus_per_actor=num_gpus_per_actor, num_cpus_per_actor=num_cpus_per_actor,
        )  # fmt: skip
        total = sum(stop - start for _, start, stop in missing)
        ray = _ray()
        try:
            with tqdm(total=total, disable=not progress, unit="img", desc="embed (ray)") as bar:
                _collect(out, missing, chunk_size, int(embedder.dim), write, bar)
        except ray.exceptions.RayError as error:  # the parts written so far are kept
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise JobError(
                f"the Ray job failed ({type(error).__name__}: {first}); the parts written so "
                "far are kept: run the same command again to finish"
            ) from error

    return job.run(shard_chunks(len(paths), chunk_size), restart, embed_missing)


def _collect(out, missing, chunk_size, dim, write, bar) -> None:
    """Gather the output rows by chunk; write each chunk when all its files are there
    (a row Ray delivers twice is kept once)."""
    bounds = {chunk: (start, stop) for chunk, start, stop in missing}
    pending: dict[int, dict[int, tuple]] = {chunk: {} for chunk in bounds}
    for table in out.iter_batches(batch_format="pyarrow", batch_size=None):
        index = table.column("index").to_numpy()
        errors = table.column("error").to_pylist()
        vectors = table.column("embedding")
        for k, i in enumerate(index.tolist()):
            chunk = i // chunk_size
            rows = pending.get(chunk)
            if rows is None or i in rows:
                continue  # a chunk written already, or a row seen before
            vector = vectors[k].values.to_numpy() if errors[k] is None else None
            rows[i] = (vector, errors[k])
            bar.update(1)
            start, stop = bounds[chunk]
            if len(rows) == stop - start:
                write(chunk, _chunk_arrays(pending.pop(chunk), dim))
    if pending:
        raise InputError(f"Ray returned no rows for {len(pending)} chunk(s) {sorted(pending)[:5]}")


def _chunk_arrays(rows: dict, dim) -> dict:
    """The arrays of one chunk (as `embedding.jobs` makes them) from {index: (vector,
    error)}."""
    order = sorted(rows)
    good = [i for i in order if rows[i][1] is None]
    bad = [i for i in order if rows[i][1] is not None]
    vectors = [np.asarray(rows[i][0], np.float32) for i in good]
    return {
        "embeddings": np.stack(vectors) if vectors else np.zeros((0, dim), np.float32),
        "index": np.asarray(good, np.int64),
        "skipped_index": np.asarray(bad, np.int64),
        "skipped_reason": np.asarray([rows[i][1] for i in bad], str).reshape(-1),
    }
