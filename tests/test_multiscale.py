"""Multi-scale features: `output_stages` shapes, timm `features_only` parity with
every parameter randomised, and a `.keras` round trip of a multi-output model."""

import keras
import numpy as np
import pytest
import timm
import torch
from conftest import nchw_to_nhwc, random_timm_model, timm_state_numpy

import weights_convert
from convnext_v1 import create_convnext_v1
from convnext_v2 import create_convnext_v2

WIDTHS_ATTO = (40, 80, 160, 320)
CREATE = {
    "v1": (create_convnext_v1, "convnext_atto"),
    "v2": (create_convnext_v2, "convnextv2_atto"),
}


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_output_stage_shapes_standard_strides(family):
    create, _ = CREATE[family]
    model = create("atto", include_top=False, output_stages=(0, 1, 2, 3), input_shape=(96, 64, 3))
    assert isinstance(model.outputs, list) and len(model.outputs) == 4  # symbolic: no run
    assert [tuple(s) for s in model.output_shape] == [
        (None, 96 // s, 64 // s, w) for s, w in zip((4, 8, 16, 32), WIDTHS_ATTO, strict=True)
    ]


def test_output_stage_subset_order_and_small_input():
    model = create_convnext_v2(
        "atto", include_top=False, output_stages=(3, 1), input_shape=(32, 32, 3)
    )
    # 32x32 lowers the stem stride to 2: strides 2, 4, 8, 16
    assert [tuple(s) for s in model.output_shape] == [(None, 2, 2, 320), (None, 8, 8, 80)]
    with pytest.raises(ValueError):
        create_convnext_v2("atto", include_top=True, output_stages=(0,))
    with pytest.raises(ValueError):
        create_convnext_v2("atto", include_top=False, output_stages=(0, 4))


def _features_only_state(full_state, features_model):
    """timm's features_only model flattens `stem.0` -> `stem_0`, `stages.1` -> `stages_1`."""
    wanted = set(features_model.state_dict())
    mapped = {}
    for key, value in full_state.items():
        for prefix in ("stem.", "stages."):
            if key.startswith(prefix):
                key = prefix[:-1] + "_" + key[len(prefix) :]
        if key in wanted:
            mapped[key] = value
    return mapped


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_stage_outputs_match_timm_features_only(family):
    create, arch = CREATE[family]
    reference = random_timm_model(arch, seed=3)  # every parameter randomised
    features = timm.create_model(arch, pretrained=False, features_only=True).eval()
    features.load_state_dict(_features_only_state(reference.state_dict(), features), strict=True)

    state = {k: v for k, v in timm_state_numpy(reference).items() if not k.startswith("head.")}
    model = create("atto", include_top=False, output_stages=(0, 1, 2, 3), input_shape=(64, 64, 3))
    weights_convert.port_state_dict(model, state)

    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype("float32")
    with torch.no_grad():
        want = [nchw_to_nhwc(f.numpy()) for f in features(torch.from_numpy(x))]
        # the same maps from the plain model's forward_intermediates
        inter = reference.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    got = [keras.ops.convert_to_numpy(o) for o in model(nchw_to_nhwc(x))]
    assert len(want) == len(got) == 4
    for stage, (g, w, i) in enumerate(zip(got, want, inter, strict=True)):
        assert g.shape == w.shape, stage
        np.testing.assert_allclose(nchw_to_nhwc(i.numpy()), w, atol=1e-6)
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=1e-4 * scale, rtol=1e-4, err_msg=f"stage {stage}")


def test_load_timm_into_multiscale_model(timm_v2_atto_checkpoint):
    load_timm = getattr(weights_convert, "load_timm", None)
    if load_timm is None:
        pytest.skip("weights_convert.load_timm not available")
    folder, reference = timm_v2_atto_checkpoint
    model = load_timm(
        folder,
        include_top=False,
        output_stages=(1, 3),
        input_shape=(64, 64, 3),
        verbose=False,
    )
    x = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype("float32")
    with torch.no_grad():
        inter = reference.forward_intermediates(torch.from_numpy(x), intermediates_only=True)
    got = model(nchw_to_nhwc(x))
    for g, stage in zip(got, (1, 3), strict=True):
        w = nchw_to_nhwc(inter[stage].numpy())
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(g), w, atol=1e-4 * scale, rtol=1e-4)


def test_multi_output_keras_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = create_convnext_v1(
        "atto", include_top=False, output_stages=(0, 2, 3), input_shape=(64, 64, 3)
    )
    path = str(tmp_path / "multi.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    after = loaded.predict(x, verbose=0)
    assert isinstance(after, list) and len(after) == 3
    for a, b in zip(after, before, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-6)
