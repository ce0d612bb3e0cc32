"""The sidecar JSON of an export (`weights_convert.export`): where it goes, and what it
says: the preprocessing (resize, crop, interpolation, mean / std and whether they are
in the graph), the input layout / dtype / shape, the outputs, the timm architecture,
the licence and a calibrated threshold.
"""

from __future__ import annotations

import math
import os

from convnext_common.jsonable import jsonable
from weights_convert.export_options import ExportError, format_for_path
from weights_convert.pretrained import channel_mean_std, license_notice

SIDECAR_KIND = "keras-convnext-export"
SIDECAR_FORMAT = 1
SAVED_MODEL_SIDECAR = "keras_convnext.json"

# what the sidecar calls an input of this many channels (PIL's modes of those images)
CHANNEL_ORDERS = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}


def export_sidecar_path(path, format: str | None = None) -> str:
    """Where the sidecar JSON of an export goes: 'm.onnx' -> 'm.onnx.json',
    'folder/' (SavedModel) -> 'folder/keras_convnext.json'."""
    path = os.fspath(path)
    format = format or format_for_path(path)
    if format == "saved_model":
        return os.path.join(path.rstrip("/" + os.sep) or path, SAVED_MODEL_SIDECAR)
    return path + ".json"


def describe_export(
    model,
    *,
    format: str,
    dtype: str,
    input_shape,
    input_dtype: str,
    with_normalization: bool,
    pretrained_cfg: dict,
    threshold: float | None = None,
) -> dict:
    """The sidecar's content: everything a deployment needs to reproduce the output."""
    import keras  # Keras: imported once a sidecar is written (--help imports this module)

    channels = input_shape[3]
    mean, std = _mean_std(pretrained_cfg, channels)
    order = CHANNEL_ORDERS.get(channels, f"{channels} channels")
    height, width = _cfg_input_size(pretrained_cfg) or input_shape[1:3]
    crop_pct = float(pretrained_cfg.get("crop_pct") or 0.875)
    metadata = dict(getattr(model, "metadata", None) or {})
    calibration = metadata.get("calibration")
    if threshold is None and calibration is not None:
        threshold = _calibrated_threshold(calibration)
    if threshold is not None and (not _is_number(threshold) or not math.isfinite(threshold)):
        raise ExportError(f"threshold must be a finite number; got {threshold!r}.")
    value_range = {"uint8": [0, 255], "float32": [0.0, 1.0]}[input_dtype]
    license_name = pretrained_cfg.get("license")
    return {
        "kind": SIDECAR_KIND,
        "format": SIDECAR_FORMAT,
        "export": {
            "format": format,
            "dtype": dtype,
            "backend": keras.backend.backend(),
            "keras_version": keras.__version__,
        },
        "timm_architecture": getattr(model, "timm_architecture", None),
        "license": license_name,
        "license_notice": license_notice(pretrained_cfg),
        "input": {
            "name": "image",
            "layout": "NHWC",
            "channel_order": order,
            "shape": list(input_shape),
            "dtype": input_dtype,
            "value": (
                f"{order} pixels in {value_range} (resized and cropped, not normalised)"
                if with_normalization
                else f"(x / 255 - mean) / std of {order} pixels x in 0..255"
            ),
        },
        "preprocessing": {
            "input_size": [int(height), int(width)],
            "resize_shorter_side_to": [math.floor(s / crop_pct) for s in (height, width)],
            "crop_pct": crop_pct,
            "crop_mode": pretrained_cfg.get("crop_mode") or "center",
            "interpolation": pretrained_cfg.get("interpolation") or "bicubic",
            "mean": list(mean),
            "std": list(std),
            "normalization_in_graph": with_normalization,
            "recipe": (
                "timm's eval transform: resize so the shorter side is floor(size / crop_pct) "
                "with the interpolation, centre-crop to input_size, scale to [0, 1]"
                + ("" if with_normalization else ", subtract mean, divide by std")
            ),
        },
        "outputs": _describe_outputs(model),
        "threshold": None if threshold is None else float(threshold),
        "calibration": calibration,
        "pretrained_cfg": jsonable(pretrained_cfg),
    }


def _describe_outputs(model) -> list[dict]:
    shapes = model.output_shape if isinstance(model.output_shape, list) else [model.output_shape]
    if len(shapes) > 1 or len(shapes[0]) != 2:
        kind = "features"
    elif getattr(model, "normalize", False):
        kind = "embedding"
    elif getattr(model, "num_classes", 0):
        kind = "logits" if getattr(model, "classifier_activation", None) is None else "scores"
    else:
        kind = "features"
    return [
        {
            "kind": kind,
            "shape": list(shape),
            "dim": shape[-1],
            "l2_normalized": bool(getattr(model, "normalize", False)) and kind == "embedding",
        }
        for shape in shapes
    ]


def _calibrated_threshold(calibration) -> float:
    threshold = calibration.get("threshold") if isinstance(calibration, dict) else None
    if not _is_number(threshold) or not math.isfinite(threshold):
        raise ExportError(
            "The model's metadata 'calibration' must be a dict with a finite 'threshold'; "
            f"got {calibration!r:.120}."
        )
    return float(threshold)


def _cfg_input_size(pretrained_cfg):
    size = (pretrained_cfg or {}).get("input_size")
    if not size:
        return None
    size = tuple(int(v) for v in size)
    return size[-2:]


def _mean_std(pretrained_cfg, channels):
    return channel_mean_std(pretrained_cfg, channels)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
