"""What identifies a run -- an embedding job (`embedding.jobs`), a fine-tuning run
(`embedding.finetune`) -- so that a resumed run is the same run: the one place a model,
a set of files or a source is hashed, and two identities compared.

Each run keeps its identity as a JSON dict of settings and digests; `changes(saved,
current)` lists what differs, and the caller names each entry in its own words.
Numpy and the standard library only (a model is anything with `get_weights()`).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

DIGEST_CHARS = 20  # hex digits kept of a SHA-256 where a short, stable name is enough


def digest(parts) -> str:
    """SHA-256 (hex) of a sequence of str / bytes parts, each followed by a NUL."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else str(part).encode())
        sha.update(b"\0")
    return sha.hexdigest()


def weights_digest(model) -> str:
    """SHA-256 of a model's weights: each weight's dtype, shape and bytes, in order (the
    variables' names are left out: Keras numbers them per process)."""
    sha = hashlib.sha256()
    for weight in model.get_weights():
        array = np.ascontiguousarray(weight)
        sha.update(f"{array.dtype}{array.shape}".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def layers_digest(model) -> str:
    """SHA-256 of a model's layer names and types (another pooling or head changes it)."""
    return digest(f"{layer.name}:{type(layer).__name__}" for layer in model.layers)


def files_digest(paths) -> str:
    """SHA-256 of files' names and contents, read in 4 MiB blocks."""
    sha = hashlib.sha256()
    for path in paths:
        sha.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
    return sha.hexdigest()


def json_digest(value) -> str:
    """SHA-256 of a JSON value, keys sorted (the key of an identity)."""
    return digest([json.dumps(value, sort_keys=True)])


def changes(saved: dict, current: dict, *, ignore=()) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each entry of two identities that differs,
    in `current`'s order, then keys only `saved` has; `ignore` lists keys that may
    differ. A key missing on one side reads as None there."""
    keys = [*current, *(key for key in saved if key not in current)]
    return [
        (key, saved.get(key), current.get(key))
        for key in keys
        if key not in ignore and saved.get(key) != current.get(key)
    ]
