"""Port timm ConvNeXt / ConvNeXt V2 checkpoints into the Keras models, and back.

    from weights_convert import load_timm, port_timm_weights, export_timm
    model = load_timm("timm/convnext_atto.d2_in1k")        # Hub id (cached), file or folder
    backbone = load_timm("path/to/model.safetensors", include_top=False)
    export_timm(model, "out.safetensors")                   # back to timm's layout

    python -m weights_convert SOURCE -o OUT.keras           # or OUT.weights.h5
    python -m weights_convert SOURCE -o OUT.onnx            # or .tflite, .xml, folder/
    python -m weights_convert SOURCE --preset DIR           # keras-hub's preset layout

Only safetensors are read (never a pickled .pth/.bin). The architecture comes
from timm's `config.json` when there is one, else it is inferred from the
tensors. Loading is strict, all or nothing: every checkpoint tensor is used
exactly once and every Keras weight is assigned, or one error lists what is
missing, unexpected and mis-shaped.

The package, along its seams:
- `architectures`: timm's architectures as `ConvNeXtConfig` rows, inference from tensors;
- `pretrained`: timm's pretrained_cfg (preprocessing, licence), validated;
- `checkpoint`: sources (Hub, file, folder), the safetensors reader, config.json;
- `mapping`: Keras <-> timm names and layouts, the strict port, the head plan;
- `convert`: `load_timm`, `port_timm_weights`, `keras_model_for`, `export_timm`;
- `saving`: `.keras` / `.weights.h5` outputs and reading them back;
- `export`: `export_model`: ONNX / LiteRT / SavedModel / OpenVINO files + a sidecar JSON
  (its options and checks in `export_options`, the writers of each format in
  `export_writers`, the sidecar in `export_sidecar`);
- `presets`: timm repositories read as presets, the parity with timm in a preset's model
  card, `write_preset` (`--preset DIR`, `--upload hf://owner/repo`);
- `errors`: one exception per kind of problem;
- `cli`: the command line (an interface: no module of the package imports it).

Files are written through `convnext_common.files` (atomic writes), re-exported here
as `atomic_write`, `atomic_path`, `atomic_write_text`.

Names are imported lazily (on first use), so `python -m weights_convert --help`
answers at once.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "errors": (
        "CheckpointError",
        "CheckpointConfigError",
        "CheckpointMismatchError",
        "CheckpointNotFoundError",
        "OutputPathError",
        "SavedModelError",
        "UnsupportedArchitectureError",
        "USER_ERRORS",
    ),
    "architectures": (
        "ARCHITECTURES",
        "architecture_config",
        "canonical_architecture",
        "check_architecture",
        "infer_architecture",
        "is_conv_mlp",
    ),
    "pretrained": (
        "DEFAULT_MODEL",
        "builtin_pretrained_cfg",
        "check_pretrained_cfg",
        "license_notice",
        "timm_default_cfg",
    ),
    "checkpoint": (
        "head_is_embedding",
        "hub_reachable",
        "load_checkpoint",
        "read_config_json",
        "read_safetensors",
        "resolve_source",
    ),
    "sources": ("hub_repo_id", "source_kind", "source_problem", "SOURCE_KINDS"),
    "mapping": (
        "LAYER_RULES",
        "TRANSFORMS",
        "WEIGHT_RULES",
        "build_ported",
        "export_state_dict",
        "head_plan",
        "plan_port",
        "port_state_dict",
        "timm_module_path",
        "weight_map",
    ),
    "convert": (
        "annotate_model",
        "export_timm",
        "keras_model_for",
        "load_timm",
        "model_architecture",
        "port_timm_weights",
        "randomize_timm_parameters",
    ),
    "saving": ("OUTPUT_SUFFIXES", "load_converted", "save_converted", "sidecar_path"),
    "export": (
        "ExportError",
        "ExportUnavailableError",
        "FORMATS",
        "export_model",
        "export_sidecar_path",
        "format_for_path",
    ),
    "presets": ("read_timm_preset", "timm_parity", "write_preset"),
    "cli": ("main",),
    # how files are written: the project's one writer (convnext_common.files)
    "convnext_common.files": ("atomic_path", "atomic_write", "atomic_write_text"),
}
_WHERE = {
    name: module if "." in module else f"weights_convert.{module}"
    for module, names in _EXPORTS.items()
    for name in names
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'weights_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
