"""Model sources by name, with nothing read and nothing heavy imported (no Keras, no
backend): what kind of source a string names (`source_kind`: a `.keras` model, an `.onnx`
export, a timm checkpoint), the Hub id it names (`hub_repo_id`) and why it names no model
at all (`source_problem`). A server running an exported `.onnx` model uses these without
loading Keras; `weights_convert.checkpoint` reads what they recognise.
"""

from __future__ import annotations

import os
import re

_HUB_ID = re.compile(r"^(?:hf-hub:|hf_hub:)?([\w.-]+/[\w.-]+)(?:@([\w./-]+))?$")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


def hub_repo_id(source) -> str | None:
    """The Hub repo id `source` names (`timm/NAME.TAG`, `hf-hub:timm/...`, `...@rev`), or
    None for an existing local path or anything else."""
    text = os.fspath(source)
    if (
        os.path.lexists(text)
        or text.endswith((".safetensors", ".keras", ".onnx", ".h5", *PICKLE_SUFFIXES))
        or text.startswith((".", "/", "~"))
    ):
        return None
    match = _HUB_ID.match(text)
    return match[1] if match else None


def source_problem(source) -> str | None:
    """Why `source` names no model at all, before anything is read: "no such file or
    folder (nor a Hub id)" or "a broken or looping symbolic link"; None for an
    existing path or a Hub id (which may still fail to load). Anything but a
    string or path is a `TypeError` naming what is accepted."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "A model source is a path (a .safetensors file, a folder with model.safetensors "
            f"+ config.json, a .keras file) or a Hub id string, got {type(source).__name__}."
        )
    text = os.fspath(source)
    if isinstance(text, bytes):
        raise TypeError("A model source is a str path or Hub id, got bytes.")
    if os.path.islink(text) and not os.path.exists(text):
        return "a broken or looping symbolic link"
    if not text.strip():
        return "empty (no path and no Hub id)"
    if not os.path.exists(text) and hub_repo_id(text) is None:
        return "no such file or folder (nor a Hub id)"
    return None


SOURCE_KINDS = ("keras", "onnx", "checkpoint")


def source_kind(source) -> str:
    """What kind of model source `source` is, by its name: "keras" for a saved Keras
    model (`.keras`, as this project writes them: converted or fine-tuned), "onnx" for an
    exported embedding model (`.onnx` + its sidecar; run by onnxruntime, without Keras:
    `embedding.onnx_embedder`), else "checkpoint" (a timm checkpoint: `.safetensors`
    file, folder, Hub id). The one place a source is recognised; nothing is read."""
    text = os.fspath(source)
    if text.endswith(".keras"):
        return "keras"
    return "onnx" if text.endswith(".onnx") else "checkpoint"
