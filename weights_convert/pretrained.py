"""timm's `pretrained_cfg` of a checkpoint: what preprocessing its weights expect and
under which licence. Validated in one place (`check_pretrained_cfg`), completed from
timm's registry when timm is importable, else from timm's defaults for ConvNeXt.

Pure Python (no Keras), so the embedding preprocessing can use it too.
"""

from __future__ import annotations

import json
import logging
import math
import sys

from weights_convert.errors import CheckpointConfigError

logger = logging.getLogger("weights_convert")

# the checkpoint used when none is named: the smallest ImageNet ConvNeXt timm publishes
DEFAULT_MODEL = "timm/convnext_atto.d2_in1k"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash")
_SIZE_KEYS = ("input_size", "test_input_size", "min_input_size")
_TUPLE_KEYS = (*_SIZE_KEYS, "mean", "std", "pool_size", "test_pool_size")
# licences that do not allow commercial use (called out when such weights load)
NON_COMMERCIAL_LICENSES = {
    "cc-by-nc-4.0": "CC BY-NC 4.0 (non-commercial)",
    "dinov3-license": "the DINOv3 License (restricted; read it before any use)",
    "fair-noncommercial-research-license": "the FAIR Noncommercial Research License",
}


def license_notice(pretrained_cfg) -> str | None:
    """A one-line warning when the weights' licence forbids commercial use, else None."""
    license_name = (pretrained_cfg or {}).get("license")
    if license_name in NON_COMMERCIAL_LICENSES:
        return (
            f"these weights are under {NON_COMMERCIAL_LICENSES[license_name]} "
            f"(pretrained_cfg license {license_name!r}): not for commercial use."
        )
    return None


def builtin_pretrained_cfg(arch: str) -> dict:
    """timm's defaults for a ConvNeXt checkpoint (its `_cfg` / `_cfgv2`)."""
    return {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "num_classes": 1000,
        "pool_size": (7, 7),
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "license": "cc-by-nc-4.0" if arch.startswith("convnextv2_") else "apache-2.0",
    }


def timm_module():
    """timm, if it can be used here: already imported, or importable without TensorFlow
    loaded (importing torch after TensorFlow crashes some builds)."""
    if "timm" in sys.modules:
        return sys.modules["timm"]
    if "tensorflow" in sys.modules:
        return None
    try:
        import timm  # optional (the convert extra), imported before TensorFlow or not at all

        return timm
    except Exception:
        return None


def timm_default_cfg(arch, tag=None, num_classes=None) -> dict:
    """timm's own pretrained_cfg for `arch[.tag]` from its registry (offline), or {}.

    Without a tag, the first of the architecture's pretrained tags whose
    num_classes matches is used, and its tag / source fields are dropped.
    """
    timm = timm_module()
    if timm is None:
        return {}
    try:
        from timm.models import get_arch_pretrained_cfgs, get_pretrained_cfg  # timm, found above

        if tag:
            cfg = get_pretrained_cfg(f"{arch}.{tag}")
            return {} if cfg is None else cfg.to_dict()
        cfgs = get_arch_pretrained_cfgs(arch) or {}
        chosen = next(
            (c for c in cfgs.values() if num_classes is None or c.num_classes == num_classes), None
        ) or get_pretrained_cfg(arch)
        if chosen is None:
            return {}
        cfg = chosen.to_dict()
        for key in ("tag", "hf_hub_id", "url", "file", "source", "hf_hub_filename"):
            cfg.pop(key, None)
        return cfg
    except Exception:
        return {}


def clean_cfg(cfg: dict) -> dict:
    """JSON-able entries only, sizes / mean / std as tuples, no None values."""
    out = {}
    for key, value in cfg.items():
        if key == "state_dict" or value is None:
            continue
        if key in _TUPLE_KEYS and isinstance(value, (list, tuple)):
            value = tuple(value)
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_pretrained_cfg(cfg, where: str = "pretrained_cfg") -> dict:
    """Validate the preprocessing fields of a pretrained_cfg; returns it cleaned.

    Raises `CheckpointConfigError` naming `where`, the field, what was found and
    what is accepted, for: sizes that are not 3 positive ints (or 2), mean / std
    that are not lists of finite numbers (one per input channel, or one for all;
    std > 0), an unknown interpolation or crop mode, a crop_pct outside (0, 1], a
    num_classes that is not an int >= 0. (`fit_channels` then fits mean / std to
    the model's input channels.)
    """
    if not isinstance(cfg, dict):
        raise CheckpointConfigError(
            f"{where} must be a JSON object, got {type(cfg).__name__} {cfg!r:.60}."
        )
    out = clean_cfg(cfg)

    def fail(key, expected):
        raise CheckpointConfigError(f"{where}: {key} must be {expected}, got {cfg[key]!r:.80}.")

    for key in _SIZE_KEYS:
        if key in out:
            size = out[key]
            if isinstance(size, int) and not isinstance(size, bool):
                size = (3, size, size)
            if (
                not isinstance(size, (list, tuple))
                or len(size) not in (2, 3)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
            ):
                fail(key, "[channels, height, width] of positive ints, e.g. [3, 224, 224]")
            out[key] = tuple(size) if len(size) == 3 else (3, *size)
    for key in ("mean", "std"):
        if key in out:
            values = out[key]
            if _number(values):
                values = (values,)
            if (
                not isinstance(values, (list, tuple))
                or not values
                or not all(_number(v) for v in values)
            ):
                fail(key, "a list of finite numbers, one per input channel (e.g. 3 for RGB)")
            if key == "std" and min(values) <= 0:
                fail(key, "positive numbers (a zero std divides by zero)")
            out[key] = tuple(float(v) for v in values)
    for key in ("crop_pct", "test_crop_pct"):
        if key in out and (not _number(out[key]) or not 0 < out[key] <= 1):
            fail(key, "a number in (0, 1]")
    if "interpolation" in out and out["interpolation"] not in INTERPOLATIONS:
        fail("interpolation", f"one of {', '.join(INTERPOLATIONS)}")
    if "crop_mode" in out and out["crop_mode"] not in CROP_MODES:
        fail("crop_mode", f"one of {', '.join(CROP_MODES)}")
    if "num_classes" in out and (
        not isinstance(out["num_classes"], int) or isinstance(out["num_classes"], bool)
        or out["num_classes"] < 0
    ):  # fmt: skip
        fail("num_classes", "an int >= 0")
    if "license" in out and not isinstance(out["license"], str):
        fail("license", "a string")
    return out


def complete_pretrained_cfg(arch: str, file_cfg: dict, num_classes: int, tag=None) -> dict:
    """A full pretrained_cfg: timm's defaults, then timm's registry entry (when the
    file lacks preprocessing fields and timm is importable), then the file's own."""
    tag = tag or file_cfg.get("tag")
    pretrained_cfg = builtin_pretrained_cfg(arch)
    needed = set(pretrained_cfg) | {"test_input_size", "test_crop_pct"}
    if not needed <= set(file_cfg):  # consult timm only when the file lacks something
        pretrained_cfg.update(clean_cfg(timm_default_cfg(arch, tag, num_classes)))
    pretrained_cfg.update(file_cfg)
    pretrained_cfg["num_classes"] = num_classes
    pretrained_cfg.setdefault("architecture", arch)
    if tag:
        pretrained_cfg.setdefault("tag", tag)
    return pretrained_cfg


def channel_mean_std(cfg, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a pretrained_cfg for a model of `channels` input channels, each of
    that length, as timm resolves them (`resolve_input_data_config`): one value for
    every channel is repeated; a length that is neither 1 nor `channels` (ImageNet's
    three for a greyscale model) becomes its average, with a warning. Missing: the
    ImageNet values."""
    cfg = cfg or {}
    resolved = []
    for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        values = cfg.get(key)
        values = default if values is None else values
        values = (values,) if _number(values) else tuple(float(v) for v in values)
        if len(values) not in (1, channels):
            average = sum(values) / len(values)
            logger.warning(
                "pretrained_cfg %s has %d values for a %d-channel model; using their mean "
                "%.4g for every channel, as timm does.",
                key,
                len(values),
                channels,
                average,
            )
            values = (average,)
        resolved.append(tuple(float(v) for v in values) * (channels if len(values) == 1 else 1))
    return resolved[0], resolved[1]


def fit_channels(cfg: dict, channels: int) -> dict:
    """`cfg` for a model of `channels` input channels: mean and std of that length
    (`channel_mean_std`), and its input sizes' channel entries set to it."""
    out = dict(cfg)
    out["mean"], out["std"] = channel_mean_std(cfg, channels)
    for key in _SIZE_KEYS:
        if out.get(key) is not None and len(out[key]) == 3:
            out[key] = (int(channels), *tuple(out[key])[1:])
    return out
