"""timm checkpoints to ready `ConvNeXt` models and back: `load_timm`,
`port_timm_weights`, `keras_model_for`, `export_timm`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import keras
from safetensors.numpy import save_file

from convnext_common.files import atomic_path
from convnext_layers import ConvNeXt, ConvNeXtConfig
from weights_convert.architectures import (
    ARCHITECTURES,
    canonical_architecture,
    check_architecture,
    infer_architecture,
)
from weights_convert.checkpoint import DEFAULT_MODEL, load_checkpoint
from weights_convert.errors import UnsupportedArchitectureError
from weights_convert.mapping import build_ported, export_state_dict, port_state_dict
from weights_convert.pretrained import builtin_pretrained_cfg

logger = logging.getLogger("weights_convert")


def keras_model_for(
    config_or_arch,
    *,
    include_top: bool = True,
    num_classes: int | None = None,
    input_shape=None,
    pooling=None,
    output_stages=None,
    head_norm: bool = True,
    normalize: bool = False,
    gem_p: float = 3.0,
    in_chans: int | None = None,
    name: str | None = None,
) -> ConvNeXt:
    """The (untrained) `ConvNeXt` of a timm architecture name or a `load_checkpoint` info.

    num_classes: default the info's (1000 for a bare architecture name); 0 gives
    timm's pre-logits features. input_shape: default (None, None, in_chans), any
    size. in_chans: default the config's. The model carries timm's architecture
    name and pretrained_cfg, and the checkpoint's training-time drop rates.
    """
    drop_rates = {}
    if isinstance(config_or_arch, dict):
        info = config_or_arch
        arch = info.get("architecture")
        if not arch:
            raise UnsupportedArchitectureError("The checkpoint info has no 'architecture'.")
        config = info.get("convnext_config") or check_architecture(arch)
        pretrained_cfg = info.get("pretrained_cfg") or {}
        default_classes = info.get("num_classes", pretrained_cfg.get("num_classes", 1000))
        head_pool = info.get("pooling", "avg")
        drop_rates = {k: info[k] for k in ("drop_rate", "drop_path_rate") if k in info}
    else:
        arch = canonical_architecture(config_or_arch)
        config = check_architecture(arch)
        pretrained_cfg = builtin_pretrained_cfg(arch)
        default_classes, head_pool = 1000, "avg"
    if num_classes is None:
        num_classes = default_classes
    if include_top and pooling is None and head_pool != "avg":
        pooling = head_pool
    config = ConvNeXtConfig.from_dict(config)
    if in_chans is not None:
        config = config.replace(in_chans=int(in_chans))
    return ConvNeXt(
        config,
        num_classes=num_classes if include_top else 0,
        include_top=include_top,
        pooling=pooling,
        head_norm=head_norm,
        normalize=normalize,
        gem_p=gem_p,
        input_shape=input_shape,
        output_stages=output_stages,
        **drop_rates,
        timm_architecture=arch,
        pretrained_cfg=pretrained_cfg,
        name=name or arch,
    )


def annotate_model(model, arch, pretrained_cfg):
    """Attach `timm_architecture` and timm's `pretrained_cfg` to a model that is not a
    `ConvNeXt` (e.g. one loaded from a file written before models carried them)."""
    object.__setattr__(model, "timm_architecture", arch)
    object.__setattr__(model, "pretrained_cfg", dict(pretrained_cfg or {}))
    return model


def load_timm(
    source=DEFAULT_MODEL,
    *,
    arch: str | None = None,
    include_top: bool = True,
    num_classes: int | None = None,
    input_shape=None,
    pooling=None,
    output_stages=None,
    head_norm: bool = True,
    normalize: bool = False,
    verbose: bool = True,
) -> ConvNeXt:
    """A ready `ConvNeXt` from a timm checkpoint: Hub id, .safetensors file or folder.

    Args:
        source: "timm/NAME.TAG" or "hf-hub:timm/NAME.TAG" (downloaded once into
            the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only), a
            local .safetensors file, or a folder with model.safetensors and
            timm's config.json.
        arch: timm architecture, overriding config.json / inference.
        include_top: keep the head. False ports everything but the head
            (pooling / output_stages as in `convnext_v1.create_convnext_v1`).
        num_classes: default the checkpoint's. Another value keeps the ported
            backbone and head norm and makes a fresh classifier (logged once);
            0 gives timm's pre-logits features (pool + head norm [+ head MLP]).
            A checkpoint without classifier (fcmae, dinov3) gives those by default.
        input_shape: default (None, None, channels): any size, like timm; a
            fixed (H, W, C) builds for that size (small sides lower the strides).
        pooling, head_norm, normalize: the head's pooling ("avg", "max", "gem";
            default the checkpoint's), head norm, and L2 normalisation of the
            output (see `convnext_layers.ConvNeXt`).
        verbose: progress bar while porting.

    The model knows its `timm_architecture`, `convnext_config` and timm's
    `pretrained_cfg` (input_size, crop_pct, interpolation, mean, std, license,
    ...), and saves them in its `.keras` file.
    """
    state_dict, info = load_checkpoint(source, arch=arch)

    def build():
        return keras_model_for(
            info,
            include_top=include_top,
            num_classes=num_classes,
            input_shape=input_shape,
            pooling=pooling,
            output_stages=output_stages,
            head_norm=head_norm,
            normalize=normalize,
        )

    return build_ported(build, state_dict, progress=verbose)


def port_timm_weights(
    model: keras.Model,
    source,
    *,
    skip_prefixes: Iterable[str] | None = None,
    progress: bool = False,
) -> keras.Model:
    """Load a timm checkpoint (Hub id, file or folder) into a model you built, strictly.

    By default the head is matched to the model (`mapping.head_plan`): head
    layers the model lacks skip those tensors, everything else must fit exactly
    (see `port_state_dict`). Pass `skip_prefixes` to decide yourself.
    """
    state_dict, info = load_checkpoint(source)
    port_state_dict(
        model,
        state_dict,
        skip_prefixes="auto" if skip_prefixes is None else skip_prefixes,
        progress=progress,
    )
    if not getattr(model, "pretrained_cfg", None):
        annotate_model(model, info["architecture"], info["pretrained_cfg"])
    return model


def model_architecture(model: keras.Model) -> str:
    """timm architecture of a Keras ConvNeXt: its own, else inferred from its weights."""
    arch = getattr(model, "timm_architecture", None)
    if arch:
        check_architecture(arch)
        return canonical_architecture(arch)
    state = export_state_dict(model)
    try:
        return infer_architecture(state)
    except UnsupportedArchitectureError:
        return infer_architecture(export_state_dict(model, conv_mlp=True))


def _conv_mlp(model, arch) -> bool:
    config = getattr(model, "convnext_config", None)
    if isinstance(config, ConvNeXtConfig):
        return config.conv_mlp
    return ARCHITECTURES[arch].conv_mlp


def export_timm(model: keras.Model, path, *, conv_mlp: bool | None = None) -> str:
    """Write the model's weights as a timm safetensors file (atomically); returns the path.

    `timm.create_model(arch, num_classes=...).load_state_dict(load_file(path))`
    accepts it strictly; a timm -> Keras -> timm round trip is bit-exact.
    """
    arch = model_architecture(model)
    if conv_mlp is None:
        conv_mlp = _conv_mlp(model, arch)
    state = export_state_dict(model, conv_mlp=conv_mlp)
    metadata = {"format": "pt", "architecture": arch}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    return os.fspath(path)


def randomize_timm_parameters(model, seed: int = 0):
    """Set every parameter of a timm (torch) model to random values, in place; returns it
    in eval mode. For checking a conversion: timm initialises layer scale to 1e-6 and
    GRN to zero, which makes almost every block an identity and hides it from any
    comparison. Norm weights go to 1 +- 0.2, other 1-D parameters (biases, layer
    scale, GRN) to +-0.2, weights to N(0, 1/fan_in) so activations keep a sane scale.
    """
    import torch  # optional (the convert extra): the caller has a timm model, so torch is there

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif param.ndim == 1:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)
    return model.eval()
