"""Quick numerical parity check of the Keras models against timm, on the current
KERAS_BACKEND: every timm parameter randomised (tests/conftest.py's
`random_timm_model`), ported with `weights_convert.port_state_dict`, logits
compared. Prints the max abs difference per variant; exits 1 above --tol.

    KERAS_BACKEND=jax python benchmarks/parity.py
"""

from __future__ import annotations

import argparse
import os
import sys

import timm  # noqa: F401  (before keras/tensorflow: see tests/conftest.py)
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from conftest import random_timm_model, timm_state_numpy  # noqa: E402

from convnext_v1 import create_convnext_v1  # noqa: E402
from convnext_v2 import create_convnext_v2  # noqa: E402
from weights_convert import port_state_dict  # noqa: E402


def check(arch, batch=2, size=224, seed=0):
    tm = random_timm_model(arch, seed=seed)
    family, variant = arch.split("_", 1)
    create = create_convnext_v2 if family == "convnextv2" else create_convnext_v1
    model = create(variant, input_shape=(size, size, 3))
    port_state_dict(model, timm_state_numpy(tm))
    x = np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32")
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    results = {}
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    results["predict_on_batch"] = np.asarray(model.predict_on_batch(nhwc))
    results["call"] = keras.ops.convert_to_numpy(model(nhwc, training=False))
    return {k: float(np.abs(v - ref).max()) for k, v in results.items()}, float(np.abs(ref).max())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--archs", default="convnext_atto,convnextv2_atto,convnext_tiny")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--tol", type=float, default=1e-4)
    args = p.parse_args()
    worst = 0.0
    for arch in args.archs.split(","):
        diffs, scale = check(arch, size=args.size)
        worst = max(worst, *diffs.values())
        print(
            f"{keras.backend.backend():10s} {arch:16s} |logits|max={scale:.3g} "
            + " ".join(f"{k}={v:.2e}" for k, v in diffs.items()),
            flush=True,
        )
    print(f"worst {worst:.2e} ({'OK' if worst < args.tol else 'FAIL'})")
    sys.exit(0 if worst < args.tol else 1)


if __name__ == "__main__":
    main()
