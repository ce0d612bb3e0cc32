"""Where a ConvNeXt downsamples: timm's layout (stem stride, each stage's stride and
dilation, from `patch_size` and `output_stride`) and this project's rule for small
inputs, which lowers strides so the last stage keeps at least 2x2 positions.

`StageLayout` is the one description the model is built from, `plan_layout` decides
it for an input size. `plan_strides` / `final_feature_size` give it as the four
numbers the README shows: the reduction at stage 0, then the stride of each later
stage's downsampling.
"""

from __future__ import annotations

from typing import NamedTuple

STANDARD_STRIDES = (4, 2, 2, 2)  # stage 0's reduction, then the downsampling before stages 1-3
MIN_FINAL_SIZE = 2
STANDARD_FROM = 64  # sides of 64 px and more always get timm's own strides
OUTPUT_STRIDES = (8, 16, 32)  # what timm's ConvNeXt accepts


class StageLayout(NamedTuple):
    """How a ConvNeXt downsamples, layer by layer.

    stem_stride: total stride of the stem (patch_size for a patch stem, 4 for the
        overlapping ones; lower for small inputs).
    strides: stride of each stage's downsampling conv (4 ints; 1 where it keeps the
        size or there is none).
    dilations: (first, blocks) per stage, timm's `dilation` pair: the downsampling
        conv's dilation and the blocks' depthwise dilation (1 unless `output_stride`
        < 32 turned strides into dilation).
    timm_strides: timm's own stage strides, which decide which downsampling layers
        exist and their kernels whatever a small input lowered.
    """

    stem_stride: int
    strides: tuple[int, int, int, int]
    dilations: tuple[tuple[int, int], ...]
    timm_strides: tuple[int, int, int, int]

    def has_downsample(self, stage: int, widths) -> bool:
        """Whether `stage` starts with a norm + conv (timm's `ConvNeXtStage.downsample`):
        its width changes, it strides, or its dilation changes. Stage 0 of a patch stem
        of stride 2 has one (timm's face-recognition ConvNeXts)."""
        width_in = widths[stage - 1] if stage > 0 else widths[0]
        first, dilation = self.dilations[stage]
        return width_in != widths[stage] or self.timm_strides[stage] > 1 or first != dilation

    def downsample_kernel(self, stage: int) -> int:
        """2 where timm's downsampling strides or changes dilation, else 1 (a 1x1 conv)."""
        first, dilation = self.dilations[stage]
        return 2 if self.timm_strides[stage] > 1 or first != dilation else 1

    def summary(self) -> tuple[int, int, int, int]:
        """(stage 0's reduction, then stage 1's, 2's and 3's downsampling strides)."""
        return (self.stem_stride * self.strides[0], *self.strides[1:])


def timm_layout(stem: str = "patch", patch_size: int = 4, output_stride: int = 32) -> StageLayout:
    """The layout timm's `ConvNeXt.__init__` builds (its stage loop, step for step)."""
    stem_stride = patch_size if stem == "patch" else 4
    current, dilation = stem_stride, 1
    strides, dilations = [], []
    for stage in range(4):
        stride = 2 if current == 2 or stage > 0 else 1
        if current >= output_stride and stride > 1:
            dilation *= stride
            stride = 1
        current *= stride
        strides.append(stride)
        dilations.append((1 if dilation in (1, 2) else 2, dilation))
    return StageLayout(stem_stride, tuple(strides), tuple(dilations), tuple(strides))


def _lowered(layout: StageLayout):
    """(stem, stage 0..3) strides, ever lower: the stem first (halving down to 1), then
    each stage's downsampling from the last stage back to the first."""
    current = [layout.stem_stride, *layout.strides]
    yield tuple(current)
    while current[0] > 1:
        current[0] = current[0] // 2 if current[0] % 2 == 0 else 1
        yield tuple(current)
    for index in (4, 3, 2, 1):
        if current[index] > 1:
            current[index] = 1
            yield tuple(current)


def stem_strides(stem: str, stride: int) -> tuple[int, ...]:
    """Strides of the stem's convolutions for its total stride (the overlapping stems'
    two convs share a total of 4, 2 or 1)."""
    if stem == "patch":
        return (stride,)
    return (min(stride, 2), stride // min(stride, 2))


def conv_padding(kernel: int, stride: int, dilation: int = 1) -> str:
    """A patch-like conv (stem, downsampling) as timm computes it: "valid" when it tiles
    its input (stride == kernel, timm's floor), else "same" (a stride lowered for a
    small input; timm's own 'same' padding of a dilated downsampling conv)."""
    return "valid" if stride == kernel and dilation == 1 else "same"


def _conv_output_size(size, kernel, stride):
    if conv_padding(kernel, stride) == "valid":
        return size // stride
    return -(-size // stride)


def _final_size(size, layer_strides, stem, patch_size, kernels):
    """Last stage's side for `size` under (stem, stage 0..3) strides and the stages'
    downsampling kernels (0: no downsampling layer)."""
    if stem == "patch":
        size = _conv_output_size(size, patch_size, layer_strides[0])
    else:  # 3x3 convs with padding 1: ceil(size / stride) each
        for stride in stem_strides(stem, layer_strides[0]):
            size = -(-size // stride)
    for kernel, stride in zip(kernels, layer_strides[1:], strict=True):
        if kernel:
            size = _conv_output_size(size, kernel, stride)
    return size


def _kernels(layout: StageLayout, widths) -> list[int]:
    # without widths: every later stage changes width (all of timm's architectures do)
    widths = widths or (1, 2, 3, 4)
    return [
        layout.downsample_kernel(s) if layout.has_downsample(s, widths) else 0 for s in range(4)
    ]


def plan_layout(
    height, width, stem: str = "patch", patch_size: int = 4, output_stride: int = 32, widths=None
) -> StageLayout:
    """The `StageLayout` for an input of `height` x `width` (None: any size).

    A side of 64 or more (or unknown sizes) gets timm's layout exactly. A smaller
    input lowers strides, stem first, then the downsampling layers from the last
    stage backwards, until the last stage is at least 2x2. Kernel shapes, dilations
    and which layers exist never change, so pretrained weights load into any of these
    layouts.
    """
    layout = timm_layout(stem, patch_size, output_stride)
    known = [s for s in (height, width) if s is not None]
    if not known or min(known) >= STANDARD_FROM:
        return layout
    kernels = _kernels(layout, widths)
    for strides in _lowered(layout):
        if _final_size(min(known), strides, stem, patch_size, kernels) >= MIN_FINAL_SIZE:
            return layout._replace(stem_stride=strides[0], strides=strides[1:])
    raise ValueError(
        f"Input {height}x{width} is too small: ConvNeXt needs at least "
        f"{MIN_FINAL_SIZE}x{MIN_FINAL_SIZE} pixels (every stride lowered to 1) and "
        f"uses its standard strides from {STANDARD_FROM}x{STANDARD_FROM} up."
    )


def plan_strides(height, width, stem: str = "patch", patch_size: int = 4, output_stride=32):
    """`plan_layout` as (stage 0's reduction, stage 1's, 2's, 3's strides): (4, 2, 2, 2)
    from 64x64 up for timm's architectures, e.g. (2, 2, 2, 2) at 32x32."""
    return plan_layout(height, width, stem, patch_size, output_stride).summary()


def final_feature_size(size, strides, stem: str = "patch", patch_size: int = 4):
    """Spatial size of the last stage for an input side `size` under `strides`, the
    four numbers of `plan_strides` (the stem's stride first; a patch stem of stride 2
    has timm's stage-0 downsampling of stride 2 after it)."""
    layout = timm_layout(stem, patch_size)
    reduction, later = strides[0], tuple(strides[1:])
    first = min(layout.timm_strides[0], reduction)  # the stem is lowered first
    layer_strides = (reduction // first, first, *later)
    return _final_size(size, layer_strides, stem, patch_size, _kernels(layout, None))
