"""Running a model over several devices and processes with `keras.distribution`: the one
place processes are joined, a distribution is chosen, counted and a model cloned under
it, and batches are split over processes and gathered back."""

from __future__ import annotations

import os

import keras
import numpy as np

from embedding.errors import FinetuneConfigError

# the environment variables `initialize_processes` reads when not given its arguments
PROCESS_ENV = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",  # the coordinator's host:port (first of a list)
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)


def process_settings(coordinator=None, num_processes=None, process_id=None, environ=None):
    """(coordinator, num_processes, process_id) from the arguments, else Keras'
    `KERAS_DISTRIBUTION_*` variables; None when neither names a multi-process run (under
    SLURM, JAX finds them itself: "slurm"). A partial or inconsistent set is refused."""
    environ = os.environ if environ is None else environ
    given = (coordinator, num_processes, process_id)
    if all(v is None for v in given):
        values = [environ.get(name) or None for name in PROCESS_ENV]
        if all(v is None for v in values):
            return "slurm" if environ.get("SLURM_JOB_ID") and environ.get("SLURM_NTASKS") else None
        given, where = values, ", ".join(PROCESS_ENV)
    else:
        where = "--coordinator, --num-processes and --process-id"
    if any(v is None for v in given):
        raise FinetuneConfigError(f"{where} go together: give all three or none.")
    coordinator = str(given[0]).split(",")[0].strip()
    try:
        count, index = int(given[1]), int(given[2])
    except ValueError:
        raise FinetuneConfigError(f"{where}: the process count and id must be integers.") from None
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise FinetuneConfigError(f"the coordinator must be HOST:PORT, got {coordinator!r}.")
    if count < 1 or not 0 <= index < count:
        raise FinetuneConfigError(
            f"the process id must lie in 0..{count - 1} for {count} processes, got {index}."
        )
    return coordinator, count, index


def initialize_processes(coordinator=None, num_processes=None, process_id=None) -> bool:
    """Join a multi-process JAX run (one process per host, started the same way on every
    host) before anything runs on a device: `jax.distributed.initialize` with the
    coordinator HOST:PORT (process 0 listens there), the process count and this
    process's id, from the arguments or the environment (`process_settings`). CPU
    collectives go through gloo (JAX's CPU client has none by default); accelerators
    use their own. Returns False when nothing names a multi-process run."""
    settings = process_settings(coordinator, num_processes, process_id)
    if settings is None:
        return False
    if keras.backend.backend() != "jax":
        raise FinetuneConfigError(
            f"several processes need the JAX backend (KERAS_BACKEND=jax), not "
            f"{keras.backend.backend()}."
        )
    import jax  # the JAX backend is the one in use here

    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if settings == "slurm":
        jax.distributed.initialize()
    else:
        address, count, index = settings
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    return True


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


def device_count(distribution) -> int:
    """How many devices share every batch (1 without a distribution)."""
    if distribution is None:
        return 1
    return int(np.prod(distribution.device_mesh.shape))


def process_info(distribution) -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) but for multi-host JAX."""
    if distribution is None or keras.backend.backend() != "jax":
        return 0, 1
    import jax  # the JAX backend is the one in use here

    return jax.process_index(), jax.process_count()


def process_share(rows: int, distribution) -> slice:
    """This process's rows of a global batch of `rows`: (index::count); all of them in a
    single-process run."""
    index, count = process_info(distribution)
    return slice(index, None, count) if count > 1 else slice(None)


def gather_rows(local: np.ndarray, distribution, rows: int) -> np.ndarray:
    """The global batch back from every process's share (`process_share`) of its `rows`
    rows: a collective, so every process calls it with the same shapes (each share padded
    to ceil(rows / count) rows). Single-process: `local` itself."""
    index, count = process_info(distribution)
    if count == 1:
        return local
    from jax.experimental import multihost_utils  # the JAX backend is the one in use here

    shares = np.asarray(multihost_utils.process_allgather(local))  # (count, per, ...)
    out = np.empty((rows, *local.shape[1:]), dtype=local.dtype)
    for k in range(count):
        mine = out[k::count]
        mine[...] = shares[k][: len(mine)]
    return out


def clone_under(model: keras.Model, distribution) -> keras.Model:
    """`model` rebuilt with its variables created under `distribution` (they must be, to be
    laid out over its devices) and its weights copied; `model` itself without one. The
    attributes the project's models carry (`pretrained_cfg`) come along."""
    if distribution is None:
        return model
    with distribution.scope():
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
    if hasattr(model, "pretrained_cfg"):
        clone.pretrained_cfg = dict(model.pretrained_cfg or {})
    return clone
