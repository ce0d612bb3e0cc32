"""ConvNeXt V2: parameter counts, GRN, and numerical parity with timm."""

import keras
import numpy as np
import pytest
import torch
from conftest import (
    count_params_unallocated,
    keras_inference,
    nchw_to_nhwc,
    random_timm_model,
    timm_state_numpy,
)
from test_convnext_v1 import timm_parameter_count

from convnext_layers import GlobalResponseNorm
from convnext_v2 import VARIANTS, create_convnext_v2
from weights_convert import port_state_dict


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_matches_timm(variant):
    count = count_params_unallocated(lambda: create_convnext_v2(variant))
    assert count == timm_parameter_count(f"convnextv2_{variant}")


def test_no_layer_scale_and_grn_in_every_block():
    model = create_convnext_v2("atto", input_shape=(64, 64, 3))
    names = [layer.name for layer in model.layers]
    assert not any("layer_scale" in n for n in names)
    assert sum(isinstance(layer, GlobalResponseNorm) for layer in model.layers) == 12


def test_grn_matches_formula(rng):
    x = rng.standard_normal((2, 5, 6, 8)).astype("float32")
    layer = GlobalResponseNorm()
    layer.build(x.shape)
    weight = rng.standard_normal(8).astype("float32")
    bias = rng.standard_normal(8).astype("float32")
    layer.weight.assign(weight)
    layer.bias.assign(bias)
    gx = np.sqrt((x.astype("float64") ** 2).sum(axis=(1, 2), keepdims=True))
    nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
    expected = x + bias + weight * (x * nx)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, atol=1e-5)


def test_grn_starts_as_identity(rng):
    x = rng.standard_normal((1, 4, 4, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(GlobalResponseNorm()(x)), x)


@pytest.mark.parametrize(
    "variant,size", [("atto", 224), pytest.param("nano", 64, marks=pytest.mark.slow)]
)
def test_logits_match_timm(variant, size):
    timm_model = random_timm_model(f"convnextv2_{variant}", seed=3)
    model = create_convnext_v2(variant, input_shape=(size, size, 3))
    port_state_dict(model, timm_state_numpy(timm_model))
    images = np.random.default_rng(3).standard_normal((2, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(images)).numpy()
    for path, logits in keras_inference(model, nchw_to_nhwc(images)).items():
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0, err_msg=path)
        assert (logits.argmax(-1) == expected.argmax(-1)).all(), path
