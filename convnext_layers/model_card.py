"""The README.md model card of a preset: the Hub's front matter (licence, library,
tags), then what the model is, what it takes, how its inputs are preprocessed, its
licence and the parity with timm measured when the preset was written."""

from __future__ import annotations

import math

# SPDX-like names the Hub's `license:` field knows; anything else is "other"
_HUB_LICENSES = {
    "apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0",
    "cc-by-nc-sa-4.0", "cc0-1.0", "openrail", "llama2", "gpl-3.0", "other",
}  # fmt: skip
_CHANNELS = {1: "greyscale", 2: "greyscale + alpha", 3: "RGB", 4: "RGBA"}


def parity_line(parity) -> str:
    """One sentence for the parity figure (or why there is none)."""
    if not parity:
        return (
            "not measured: timm and this project's converter (`weights_convert`) were not "
            "importable where the preset was written"
        )
    if parity.get("max_abs_diff") is None:
        return f"not measured: {parity.get('reason', 'no timm counterpart')}"
    return parity.get("summary") or f"max |Keras - timm| = {parity['max_abs_diff']:.2g}"


def _output(model) -> str:
    shape = model.output_shape
    shapes = shape if isinstance(shape, list) else [shape]
    text = ", ".join(str(tuple(s)) for s in shapes)
    if model.output_stages is not None:
        return f"{text}: feature maps of stages {list(model.output_stages)}"
    if model.normalize:
        return f"{text}: L2-normalised embedding"
    if model.include_top and model.num_classes:
        return f"{text}: logits of {model.num_classes} classes (or embedding dimensions)"
    return f"{text}: features"


def _preprocessing(cfg, channels) -> str:
    size = tuple(cfg.get("input_size") or (channels, 224, 224))[-2:]
    crop = float(cfg.get("crop_pct") or 0.875)
    scale = [math.floor(s / crop) for s in size]
    return (
        f"resize the shorter side to {scale[0]} ({cfg.get('interpolation') or 'bicubic'}), "
        f"centre-crop {size[0]}x{size[1]}, scale to [0, 1], subtract mean "
        f"{list(cfg.get('mean') or [])}, divide by std {list(cfg.get('std') or [])} "
        "(timm's evaluation transform; `embedding.Preprocessor` does it exactly)"
    )


def _architecture(model, metadata) -> str:
    config = model.convnext_config
    arch = model.timm_architecture or "ConvNeXt"
    args = metadata.get("timm_model_args")
    detail = (
        f"depths {list(config.depths)}, widths {list(config.widths)}, {config.stem} stem"
        + (f" {config.patch_size}x{config.patch_size}" if config.stem == "patch" else "")
        + f", {config.norm}, {config.activation}"
        + (", GRN (V2)" if config.use_grn else "")
        + ("" if config.layer_scale_init_value is None else ", layer scale")
        + ("" if config.output_stride == 32 else f", output stride {config.output_stride}")
    )
    if args is not None:
        detail += f"; timm: `timm.models.convnext.ConvNeXt(**{args})`"
    return f"{arch} ({detail})"


def model_card(model, metadata: dict) -> str:
    """README.md of a preset of `model`, from its `metadata.json` content."""
    cfg = metadata.get("pretrained_cfg") or {}
    license_name = metadata.get("license") or "unknown"
    hub_license = license_name if license_name in _HUB_LICENSES else "other"
    channels = model.convnext_config.in_chans
    kind = "image-feature-extraction" if not model.num_classes else "image-classification"
    size = tuple(cfg.get("input_size") or (channels, 224, 224))[-2:]
    name = model.timm_architecture or model.name
    lines = [
        "---",
        "library_name: keras",
        f"license: {hub_license}",
        f"pipeline_tag: {kind}",
        "tags: [keras, keras-hub, keras-convnext, convnext, timm]",
        "---",
        "",
        f"# {name} (Keras 3)",
        "",
        f"A ConvNeXt for Keras 3 (JAX, TensorFlow, PyTorch) in keras-hub's preset layout, "
        f"written by keras-convnext {metadata.get('keras_convnext_version', 'unknown')} on "
        f"{metadata.get('date', 'an unknown date')}.",
        "",
        "| | |",
        "|---|---|",
        f"| Architecture | {_architecture(model, metadata)} |",
        f"| Parameters | {metadata.get('parameter_count', model.count_params()):,} |",
        f"| Input | {size[0]}x{size[1]} {_CHANNELS.get(channels, f'{channels}-channel')}"
        " images (any size is accepted) |",
        f"| Output | {_output(model)} |",
        f"| Preprocessing | {_preprocessing(cfg, channels)} |",
        f"| Licence | {license_name} (the weights' own licence, from their pretrained_cfg) |",
        f"| Parity with timm | {parity_line(metadata.get('parity'))} |",
        "",
        "## Use",
        "",
        "```python",
        "from convnext_layers import ConvNeXt",
        "",
        'model = ConvNeXt.from_preset("hf://OWNER/REPO")  # or the preset folder',
        "```",
        "",
        "Files: `config.json` (the Keras model, `registered_name` convnext>ConvNeXt), "
        "`model.weights.h5`, `metadata.json` (versions, parameter count, date, timm "
        "architecture and arguments, pretrained_cfg, licence, parity, sha256 of each file).",
        "",
    ]
    return "\n".join(lines)
