"""ConvNeXt V1: parameter counts and numerical parity with timm."""

import keras
import numpy as np
import pytest
import torch
from conftest import (
    built_unallocated,
    count_params_unallocated,
    keras_inference,
    nchw_to_nhwc,
    random_timm_model,
    timm_state_numpy,
)

from convnext_v1 import VARIANTS, create_convnext_v1
from weights_convert import port_state_dict


def timm_parameter_count(arch):
    with torch.device("meta"):  # shapes only, nothing allocated
        import timm

        model = timm.create_model(arch)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_count_matches_timm(variant):
    count = count_params_unallocated(lambda: create_convnext_v1(variant))
    assert count == timm_parameter_count(f"convnext_{variant}")


def compare_with_timm(variant, size, batch=2, seed=0):
    timm_model = random_timm_model(f"convnext_{variant}", seed=seed)
    model = create_convnext_v1(variant, input_shape=(size, size, 3))
    port_state_dict(model, timm_state_numpy(timm_model))
    images = np.random.default_rng(seed).standard_normal((batch, 3, size, size), dtype=np.float32)
    with torch.no_grad():
        expected = timm_model(torch.from_numpy(images)).numpy()
    return keras_inference(model, nchw_to_nhwc(images)), expected


def test_atto_logits_match_timm_at_224():
    outputs, expected = compare_with_timm("atto", 224)
    for path, logits in outputs.items():
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0, err_msg=path)
        assert (logits.argmax(-1) == expected.argmax(-1)).all(), path


@pytest.mark.slow  # a large variant (13 s); the quick suite compares tiny via weights_convert
def test_tiny_logits_match_timm_on_small_input():
    outputs, expected = compare_with_timm("tiny", 64)
    for path, logits in outputs.items():
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0, err_msg=path)


def test_layer_scale_init_and_none():
    model = create_convnext_v1("atto", input_shape=(64, 64, 3), layer_scale_init_value=0.5)
    gamma = model.get_layer("stage0_block0_layer_scale").gamma
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(gamma), np.full((40,), 0.5))
    plain = create_convnext_v1("atto", input_shape=(64, 64, 3), layer_scale_init_value=None)
    assert not any("layer_scale" in layer.name for layer in plain.layers)


def test_large_feature_map_shape():
    def build():
        return create_convnext_v1("large", include_top=False, input_shape=(256, 256, 3))

    with built_unallocated(build) as model:
        assert model.output_shape == (None, 8, 8, 1536)
