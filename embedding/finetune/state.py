"""A fine-tuning run's checkpoint folder: what identifies the run (so that only the same
run resumes), its progress after every epoch, and reading both back.

The folder holds `train.keras` (the compiled ArcFace training model: embedding model,
centres, optimizer) and `state.json` (format, the run's identity, its `Progress`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

import weights_convert
from convnext_common.files import atomic_write, atomic_write_text
from convnext_common.jsonable import jsonable
from embedding import runs
from embedding.errors import ModelSourceError, ResumeMismatchError
from embedding.finetune.config import FinetuneConfig
from embedding.metrics import VerificationMetrics
from embedding.model import source_fingerprint

CHECKPOINT_MODEL = "train.keras"
CHECKPOINT_STATE = "state.json"
STATE_FORMAT = 2  # bump when state.json changes meaning


# ----------------------------------------------------------------------------
# Identity: what a checkpoint must match to be resumed
# ----------------------------------------------------------------------------


def check_source_exists(model) -> None:
    """Refuse a model argument that names nothing, before anything is read."""
    if isinstance(model, keras.Model):
        return
    if not isinstance(model, (str, os.PathLike)):
        # finetune alone also takes a keras.Model: say so (source_problem names the rest)
        raise TypeError(
            f"model must be a keras.Model, a .keras file or a checkpoint source, got "
            f"{type(model).__name__}."
        )
    problem = weights_convert.source_problem(model)
    if problem is not None:
        raise ModelSourceError(os.fspath(model), problem)


def model_fingerprint(model) -> dict:
    """{"model": what was given, "model_content": a digest of its content}
    (`embedding.runs`).

    A `keras.Model`: its weights (names are not used: they change with every
    model built in a process). A local file or folder: its weights and config
    files. A Hub id: the Hub cache's content hash (the id alone if not cached).
    """
    chars = runs.DIGEST_CHARS
    if isinstance(model, keras.Model):
        content = runs.digest([json.dumps(list(model.input_shape)), runs.weights_digest(model)])
        return {"model": f"<keras.Model {model.name}>", "model_content": content[:chars]}
    source = os.fspath(model)
    if os.path.isdir(source):
        names = ("model.safetensors", "config.json")
        files = [os.path.join(source, n) for n in names if os.path.isfile(os.path.join(source, n))]
    elif os.path.isfile(source):
        sidecar = (
            weights_convert.sidecar_path(source)
            if weights_convert.source_kind(source) == "keras"
            else os.path.join(os.path.dirname(os.path.abspath(source)), "config.json")
        )
        files = [source, sidecar] if os.path.isfile(sidecar) else [source]
    else:
        return {"model": source, "model_content": source_fingerprint(source) or source}
    return {"model": os.path.abspath(source), "model_content": runs.files_digest(files)[:chars]}


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
    """One "name: was X, now Y" line per entry of `run_identity` that differs
    (`embedding.runs.changes`); an older checkpoint without "devices" matches any."""
    lines = []
    ignore = {"data_size", "model", *({"devices"} if "devices" not in saved else ())}
    for key, was, now in runs.changes(saved, current, ignore=ignore):
        if key not in current:
            continue  # recorded by an older version, no longer part of the identity
        if key not in saved:
            was = "<not recorded>"
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
# Progress: what state.json records after every epoch
# ----------------------------------------------------------------------------


@dataclass
class Progress:
    """Where a run stands: epochs done, the phase ("frozen" / "tuned"), one history
    record per epoch, and the best held-out EER so far (epoch 0: the input model)."""

    epoch: int = 0
    phase: str | None = None
    history: list = field(default_factory=list)
    best_eer: float = float("inf")
    best_epoch: int = 0
    metrics_before: VerificationMetrics | None = None
    best_metrics: VerificationMetrics | None = None

    def to_state(self, identity: dict) -> dict:
        record = asdict(self)
        record["metrics_before"] = _metrics_record(self.metrics_before)
        record["best_metrics"] = _metrics_record(self.best_metrics)
        return {"format": STATE_FORMAT, "identity": identity, **record}

    @classmethod
    def from_state(cls, state: dict) -> Progress:
        return cls(
            epoch=state["epoch"],
            phase=state["phase"],
            history=state["history"],
            best_eer=state["best_eer"],
            best_epoch=state["best_epoch"],
            metrics_before=_metrics_from(state["metrics_before"]),
            best_metrics=_metrics_from(state["best_metrics"]),
        )


def _metrics_record(metrics):
    if metrics is None:
        return None
    out = metrics.to_dict()
    out.pop("kfold", None)
    return jsonable(out, unknown="str")


def _metrics_from(record):
    if record is None:
        return None
    record = dict(record)
    for key in ("tar_at_far", "threshold_at_far"):
        record[key] = {float(k): v for k, v in record[key].items()}
    return VerificationMetrics(**record)


# ----------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointFolder:
    """Where a run keeps its training state (`None` folder: a run without checkpoints)."""

    folder: str | None

    @property
    def model_path(self) -> str:
        return os.path.join(self.folder, CHECKPOINT_MODEL)

    @property
    def state_path(self) -> str:
        return os.path.join(self.folder, CHECKPOINT_STATE)

    def has_state(self) -> bool:
        return self.folder is not None and os.path.exists(self.state_path)

    def read(self, identity: dict) -> dict:
        """The checkpoint's state if it belongs to this run, else `ResumeMismatchError`."""
        where = self.folder
        try:
            with open(self.state_path) as f:
                state = json.load(f)
        except (OSError, ValueError) as error:
            raise ResumeMismatchError(
                f"Checkpoint {where} cannot be read ({error}); pass resume=False "
                "(--no-resume) to start over."
            ) from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ResumeMismatchError(
                f"Checkpoint {where} is from a different run (written by another version "
                "of this library); pass resume=False (--no-resume) to start over, or another "
                "checkpoint folder."
            )
        differences = identity_differences(state.get("identity", {}), identity)
        if differences:
            raise ResumeMismatchError(
                f"Checkpoint {where} is from a different run; what differs: "
                + "; ".join(differences)
                + ". Pass resume=False (--no-resume) to start over, or another checkpoint "
                "folder (--checkpoint-dir)."
            )
        if not os.path.isfile(self.model_path):
            raise ResumeMismatchError(
                f"Checkpoint {where} has {CHECKPOINT_STATE} but no {CHECKPOINT_MODEL}; "
                "pass resume=False (--no-resume) to start over."
            )
        return state

    def write(self, train_model: keras.Model, progress: Progress, identity: dict) -> None:
        """The training model, then the state naming it: each file atomically."""
        atomic_write(self.model_path, train_model.save)
        state = progress.to_state(identity)
        atomic_write_text(self.state_path, json.dumps(jsonable(state, unknown="str"), indent=1))
