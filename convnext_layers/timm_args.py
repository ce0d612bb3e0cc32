"""timm's `ConvNeXt(...)` constructor, argument by argument: how each one is held here.

`TIMM_ARGUMENTS` classifies every parameter of `timm.models.convnext.ConvNeXt.__init__`
(tests walk timm's signature against it, so an argument timm adds later fails
loudly instead of being dropped):

- "config": a `ConvNeXtConfig` field (the network itself);
- "model": a `ConvNeXt` argument (num_classes, global_pool -> pooling, drop_rate,
  drop_path_rate): the head and training-time regularisation;
- "init": how timm initialises fresh weights (head_init_scale); a loaded checkpoint
  replaces them, and a fresh Keras head keeps Keras' initialisers;
- "placement": where torch allocates (device, dtype); a checkpoint's tensors carry
  their own dtype, cast to the Keras variables' on loading.

`split_timm_args(model_args)` reads a config.json's `model_args` into config changes
and model options; any value the Keras models cannot compute exactly is a
`ConfigError` naming the argument and its value, raised before any weight is read.
`timm_args(config)` is the way back (what `timm.models.convnext.ConvNeXt` takes to
build the same network).
"""

from __future__ import annotations

from convnext_layers.errors import ConfigError

TIMM_ARGUMENTS = {
    "in_chans": ("config", "in_chans"),
    "num_classes": ("model", "num_classes"),
    "global_pool": ("model", "pooling"),
    "output_stride": ("config", "output_stride"),
    "depths": ("config", "depths"),
    "dims": ("config", "widths"),
    "kernel_sizes": ("config", "kernel_sizes"),
    "ls_init_value": ("config", "layer_scale_init_value"),
    "stem_type": ("config", "stem"),
    "patch_size": ("config", "patch_size"),
    "head_init_scale": ("init", None),
    "head_norm_first": ("config", "head_norm_first"),
    "head_hidden_size": ("config", "head_hidden_size"),
    "conv_mlp": ("config", "conv_mlp"),
    "conv_bias": ("config", "conv_bias"),
    "use_grn": ("config", "use_grn"),
    "act_layer": ("config", "activation"),
    "norm_layer": ("config", "norm"),
    "norm_eps": ("config", "norm_eps"),
    "drop_rate": ("model", "drop_rate"),
    "drop_path_rate": ("model", "drop_path_rate"),
    "device": ("placement", None),
    "dtype": ("placement", None),
}
# what timm's create_model takes besides the constructor's arguments and may record in
# model_args: they describe the weights' source, not the network
TIMM_FACTORY_ARGUMENTS = frozenset(
    {"pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict"}
)
# not timm ConvNeXt arguments, but fields a config.json from this project's early
# releases could hold
_LEGACY_FIELDS = {"mlp_ratio": "mlp_ratio"}

# timm norm_layer spellings -> ours (the 2-D and channels-last timm classes compute the same)
NORM_NAMES = {
    "layernorm": "layernorm",
    "layernorm2d": "layernorm",
    "rmsnorm": "rmsnorm",
    "rmsnorm2d": "rmsnorm",
    "simplenorm": "simplenorm",
    "simplenorm2d": "simplenorm",
}
_NORM_TO_TIMM = {"layernorm": "layernorm", "rmsnorm": "rmsnorm", "simplenorm": "simplenorm"}
# timm's act_layer names (timm.layers.create_act) with an exact Keras counterpart (the
# activation of the blocks' MLP and of the "overlap_act" stem; the head's is always GELU)
ACTIVATION_NAMES = (
    "gelu", "gelu_tanh", "quick_gelu", "silu", "mish", "relu", "relu6", "leaky_relu", "elu",
    "celu", "selu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish", "hard_mish", "identity",
)  # fmt: skip
# timm's other spellings of the same functions
ACTIVATION_ALIASES = {"swish": "silu", "hardsigmoid": "hard_sigmoid", "hardswish": "hard_swish"}
# timm's global_pool values -> this project's pooling ("fast" variants compute the same)
POOL_NAMES = {"avg": "avg", "max": "max", "avgmax": "avgmax", "catavgmax": "catavgmax"}


def _refuse(name, value, why):
    raise ConfigError(f"timm argument {name}={value!r} {why}")


def _pooling(value):
    name = value.lower() if isinstance(value, str) else value
    if isinstance(name, str) and name.startswith("fast"):
        name = name[len("fast") :] or "avg"
    if name not in POOL_NAMES:
        _refuse(
            "global_pool",
            value,
            "is not supported: the Keras models pool with "
            + ", ".join(repr(p) for p in POOL_NAMES)
            + " (and their 'fast' forms); '' (per-position logits) is not one of them.",
        )
    return POOL_NAMES[name]


def canonical_activation(name):
    """timm's act_layer name as this project spells it ("Swish" -> "silu"), or None."""
    if not isinstance(name, str):
        return None
    name = ACTIVATION_ALIASES.get(name.lower(), name.lower())
    return name if name in ACTIVATION_NAMES else None


def _activation(value):
    if isinstance(value, str) and value.lower() == "prelu":
        _refuse("act_layer", value, "is not supported: PReLU has weights of its own.")
    name = canonical_activation(value)
    if name is None:
        choices = ", ".join((*ACTIVATION_NAMES, *ACTIVATION_ALIASES))
        _refuse("act_layer", value, f"is not supported; one of {choices}.")
    return name


def _norm(value):
    if value is None:
        return "layernorm"
    if value not in NORM_NAMES:
        _refuse("norm_layer", value, f"is not supported; one of {', '.join(NORM_NAMES)}.")
    return NORM_NAMES[value]


def _config_value(name, value):
    """The `ConvNeXtConfig` value of timm argument `name`, or None to keep the default."""
    if name == "norm_layer":
        return _norm(value)
    if name == "act_layer":
        return _activation(value)
    if name == "output_stride" and value not in (8, 16, 32):
        _refuse(name, value, "is not supported; timm's ConvNeXt takes 8, 16 or 32.")
    return value


def split_timm_args(model_args: dict) -> tuple[dict, dict]:
    """(ConvNeXtConfig changes, ConvNeXt model options) from timm `model_args`.

    None values are taken as timm's constructor takes them (ls_init_value=None: no
    layer scale; norm_eps=None: each norm's default). Anything that is no argument of
    timm's ConvNeXt, or a value the Keras models cannot compute exactly, is a
    `ConfigError` naming it.
    """
    if not isinstance(model_args, dict):
        raise ConfigError(f"model_args must be a JSON object, got {type(model_args).__name__}.")
    changes, options, unknown = {}, {}, []
    for name, value in model_args.items():
        kind, field = TIMM_ARGUMENTS.get(name, (None, None))
        if name in _LEGACY_FIELDS:
            changes[_LEGACY_FIELDS[name]] = value
        elif kind == "config":
            if name == "norm_eps" and value is None:
                continue  # every timm norm's own default: 1e-6, the config's
            changes[field] = _config_value(name, value)
        elif kind == "model":
            if name == "global_pool":
                value = _pooling(value)
            options[field] = value
        elif kind is None and name not in TIMM_FACTORY_ARGUMENTS:
            unknown.append(f"{name}={value!r}")
    if unknown:
        raise ConfigError(
            "timm model_args that are no argument of timm's ConvNeXt: " + ", ".join(sorted(unknown))
        )
    return changes, options


def timm_args(config) -> dict:
    """The arguments of `timm.models.convnext.ConvNeXt` that build `config`'s network
    (without the head's num_classes / global_pool). A config timm cannot build (an
    mlp_ratio other than 4) is a `ConfigError`."""
    if config.mlp_ratio != 4.0:
        raise ConfigError(
            f"timm's ConvNeXt has no mlp_ratio argument (this config: {config.mlp_ratio})."
        )
    args = {}
    for name, (kind, field) in TIMM_ARGUMENTS.items():
        if kind != "config":
            continue
        value = getattr(config, field)
        if name == "norm_layer":
            value = _NORM_TO_TIMM[value]
        args[name] = list(value) if isinstance(value, tuple) else value
    return args
