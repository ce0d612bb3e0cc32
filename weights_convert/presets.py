"""What presets need from the converter: reading a timm repository as a preset
(`read_timm_preset`), the parity of a model with timm's (`timm_parity`), and writing /
uploading a preset from a checkpoint (`write_preset`, for `--preset` / `--upload`).

`convnext_layers.presets` finds the first two through the entry points this package
declares ("keras_convnext.preset_readers", "keras_convnext.parity" in
pyproject.toml), so `ConvNeXt.from_preset("hf://timm/convnext_atto.d2_in1k")` works
without importing this module; importing it registers them too (a source checkout
that is not installed has no entry points).
"""

from __future__ import annotations

import os

import keras
import numpy as np

from convnext_layers import ConvNeXt, presets
from convnext_layers.errors import ConfigError
from weights_convert import convert
from weights_convert.mapping import export_state_dict
from weights_convert.pretrained import timm_module

PARITY_BATCH = 2
PARITY_SIDE = 224  # without an input_size in the pretrained_cfg
_TIMM_POOLS = {"avg": "avg", "max": "max", "avgmax": "avgmax", "catavgmax": "catavgmax"}


def read_timm_preset(source, config: dict):
    """A `ConvNeXt` from a timm repository or folder given as a preset (its config.json
    names an "architecture"); None for anything else."""
    if "architecture" not in config:
        return None
    kind, where, revision = presets.parse_preset_source(source)
    where = where if kind == "folder" else f"{where}@{revision}" if revision else where
    return convert.load_timm(where, verbose=False)


def _timm_reference(model):
    """timm's `ConvNeXt` of `model`'s config and head, holding `model`'s weights; None
    (and why) when timm has no such network."""
    # timm: optional (the convert extra); `timm_parity` checked `timm_module()` first
    from timm.models.convnext import ConvNeXt as TimmConvNeXt

    config = model.convnext_config
    try:
        args = config.to_timm_args()
    except ConfigError as error:
        return None, str(error)
    pooling = model.pooling or "avg"
    if pooling not in _TIMM_POOLS:
        return None, f"pooling {pooling!r} has no timm counterpart"
    if model.include_top and not model.head_norm and not config.head_norm_first:
        return None, "a head without timm's head norm has no timm counterpart"
    reference = TimmConvNeXt(
        **args, num_classes=model.num_classes, global_pool=_TIMM_POOLS[pooling]
    ).eval()
    state = export_state_dict(model, conv_mlp=config.conv_mlp)
    import torch  # optional (the convert extra), as timm above

    result = reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, False)
    # the head's tensors where the model has none; norm_pre where it returns stage maps
    absent = ("head.",) if model.output_stages is None else ("head.", "norm_pre.")
    if result.unexpected_keys or [k for k in result.missing_keys if not k.startswith(absent)]:
        return None, "the weights do not fit timm's network"
    return reference, None


def _timm_output(model, reference, x):
    """timm's counterpart of `model`'s output for NCHW `x` (torch)."""
    # torch: optional (the convert extra), there with the timm reference
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        if model.output_stages is not None:
            stages = reference.forward_intermediates(
                x, indices=list(model.output_stages), intermediates_only=True
            )
            return [s.permute(0, 2, 3, 1).numpy() for s in stages], "stage feature maps"
        features = reference.forward_features(x)
        if not model.include_top:
            if model.pooling is None:
                return features.permute(0, 2, 3, 1).numpy(), "feature map"
            out, what = reference.head.global_pool(features).flatten(1), "pooled features"
        else:
            out = reference.forward_head(features, pre_logits=not model.num_classes)
            what = "logits" if model.num_classes else "pre-logits features"
        if model.normalize:
            out, what = F.normalize(out, dim=-1), "L2-normalised embedding"
        return out.numpy(), what


def timm_parity(model) -> dict | None:
    """max |model - timm| on random inputs, timm's network built from the model's own
    weights: {"max_abs_diff", "output", "input_shape", "backend", "timm_version",
    "summary"}; None where timm is not importable or `model` is no `ConvNeXt`."""
    timm = timm_module()
    if timm is None or not isinstance(model, ConvNeXt):
        return None
    import torch  # optional (the convert extra): timm, found above, brought it

    reference, reason = _timm_reference(model)
    if reference is None:
        return {"max_abs_diff": None, "reason": reason}
    height, width, channels = model.input_shape[1:]
    size = tuple((model.pretrained_cfg or {}).get("input_size") or (0, PARITY_SIDE, PARITY_SIDE))
    height, width = height or size[-2], width or size[-1]
    shape = (PARITY_BATCH, channels, height, width)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    expected, what = _timm_output(model, reference, torch.from_numpy(x))
    got = model.predict_on_batch(np.transpose(x, (0, 2, 3, 1)))
    pairs = zip(got, expected, strict=True) if isinstance(expected, list) else [(got, expected)]
    worst = max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in pairs)
    backend = keras.backend.backend()
    return {
        "max_abs_diff": worst,
        "output": what,
        "input_shape": [PARITY_BATCH, height, width, channels],
        "backend": backend,
        "timm_version": timm.__version__,
        "summary": (
            f"max |Keras - timm| = {worst:.2g} on the {what} of {PARITY_BATCH} random "
            f"{height}x{width}x{channels} inputs ({backend} backend, float32, timm "
            f"{timm.__version__}), measured when the preset was written"
        ),
    }


def write_preset(source, directory, *, arch=None, include_top=True, num_classes=None, verbose=True):
    """Convert a timm checkpoint (Hub id, file or folder) and write it as a preset folder
    (`ConvNeXt.save_to_preset`, the parity measured); returns the model."""
    model = convert.load_timm(
        source, arch=arch, include_top=include_top, num_classes=num_classes, verbose=verbose
    )
    model.save_to_preset(os.fspath(directory))
    return model


presets.register_preset_reader("timm", read_timm_preset)
presets.register_parity("timm", timm_parity)
