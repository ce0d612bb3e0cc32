"""convnext_layers.strides: timm's layout of strides and dilations, and the small-input
plan, against timm's own modules (built on the meta device: shapes, no weights)."""

import itertools

import pytest
import timm
import torch
from conftest import built_unallocated

from convnext_layers import ConvNeXt, ConvNeXtConfig, plan_layout, plan_strides
from convnext_layers.strides import timm_layout

SMALL = ConvNeXtConfig(depths=(1, 1, 1, 1), widths=(8, 16, 24, 32))


def _timm_stages(stem, patch_size, output_stride):
    """(stem stride, [(downsample (kernel, stride, dilation) or None, block dilation)])
    of timm's ConvNeXt."""
    with torch.device("meta"):
        model = timm.models.convnext.ConvNeXt(
            depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), stem_type=stem,
            patch_size=patch_size, output_stride=output_stride,
        )  # fmt: skip
    stem_stride = 1
    for module in model.stem:
        if isinstance(module, torch.nn.Conv2d):
            stem_stride *= module.stride[0]
    stages = []
    for stage in model.stages:
        down = None
        if isinstance(stage.downsample, torch.nn.Sequential):
            conv = stage.downsample[1]
            down = (conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        stages.append((down, stage.blocks[0].conv_dw.dilation[0]))
    return stem_stride, stages


@pytest.mark.once("jax")  # pure Python against timm
@pytest.mark.parametrize(
    "stem,patch_size,output_stride",
    [*itertools.product(["patch"], [1, 2, 3, 4, 8], [8, 16, 32]), ("overlap", 4, 8)],
)
def test_layout_is_timms(stem, patch_size, output_stride):
    layout = timm_layout(stem, patch_size, output_stride)
    stem_stride, stages = _timm_stages(stem, patch_size, output_stride)
    assert layout.stem_stride == stem_stride
    for index, (down, dilation) in enumerate(stages):
        first, blocks = layout.dilations[index]
        assert blocks == dilation
        assert layout.has_downsample(index, SMALL.widths) == (down is not None)
        if down is not None:
            assert down == (layout.downsample_kernel(index), layout.strides[index], first)


@pytest.mark.once("jax")
def test_small_inputs_lower_strides_of_every_layout():
    # timm's architectures: the README's figures
    assert plan_strides(224, 224) == (4, 2, 2, 2) and plan_strides(32, 32) == (2, 2, 2, 2)
    # a stride-2 patch stem (face models): stem 2 then stage 0's stride-2 downsampling
    face = plan_layout(32, 32, "patch", 2)
    assert (face.stem_stride, face.strides) == (1, (2, 2, 2, 2))
    assert plan_layout(112, 112, "patch", 2) == timm_layout("patch", 2)
    # dilation stays where timm put it; only strides are lowered
    dilated = plan_layout(16, 16, "patch", 4, 16)
    assert dilated.dilations == timm_layout("patch", 4, 16).dilations
    assert dilated.summary() == (2, 2, 2, 1)  # 16 -> 8 -> 4 -> 2 -> 2 (stage 3 dilated)


@pytest.mark.parametrize(
    "changes,side",
    [({"patch_size": 2}, 32), ({"output_stride": 16}, 16), ({"patch_size": 8}, 40)],
)
def test_small_inputs_keep_the_last_stage_at_least_2x2(changes, side):
    config = SMALL.replace(**changes)

    def shapes(input_shape):
        build = lambda: ConvNeXt(config, include_top=False, input_shape=input_shape)  # noqa: E731
        with built_unallocated(build) as model:
            return model.output_shape, [tuple(w.shape) for w in model.weights]

    (output, small), (_, full) = shapes((side, side, 3)), shapes((None, None, 3))
    assert min(output[1:3]) >= 2
    assert small == full  # the same weights load into both
