"""Cross-backend agreement (subprocesses) and the offline demo."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

EMBED_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import skimage.data
    from embedding import Embedder
    checkpoint, out = sys.argv[1], sys.argv[2]
    emb = Embedder(checkpoint, batch_size=4, cache=False)
    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.camera()]
    np.save(out, emb.embed(images))
    """
)


@pytest.mark.slow
@pytest.mark.once("jax")  # starts all three backends itself
def test_backends_agree_on_embeddings(timm_atto_checkpoint, tmp_path):
    folder, _ = timm_atto_checkpoint
    procs = {}
    for backend in ("jax", "tensorflow", "torch"):
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
        procs[backend] = subprocess.Popen(
            [sys.executable, "-c", EMBED_SCRIPT, str(folder), str(tmp_path / f"{backend}.npy")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for backend, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{backend} failed:\n{err[-3000:]}"
    vectors = {b: np.load(tmp_path / f"{b}.npy") for b in procs}
    assert vectors["jax"].shape == (3, 320)
    for backend in ("tensorflow", "torch"):
        np.testing.assert_allclose(vectors[backend], vectors["jax"], atol=1e-5, err_msg=backend)


@pytest.mark.slow
def test_demo_offline_labels_random_weights(capsys):
    from embedding.cli.demo import run_demo

    assert run_demo(offline=True) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out and "NOT pretrained" in out
    embedding_diff = float(re.search(r"embeddings \(vs timm.*?:\s+([0-9.e+-]+)", out).group(1))
    preprocess_diff = float(re.search(r"preprocessing \(vs timm.*?:\s+([0-9.e+-]+)", out).group(1))
    assert embedding_diff < 1e-5 and preprocess_diff < 1e-5, out
    assert "astronaut-flip" in out


@pytest.mark.slow
def test_demo_offline_without_timm_labels_untrained_and_names_the_extra(capsys, monkeypatch):
    """The default install has no timm / torch: the demo still runs offline, on an
    untrained network built by this library, says so, and names the extra for timm."""
    import embedding.cli.demo as demo

    monkeypatch.setattr(demo, "_import_convert_extra", lambda: None)
    assert demo.run_demo(offline=True) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED convnext_atto" in out and "NOT pretrained" in out
    assert "pip install -e '.[convert]'" in out
    assert "vs timm" not in out  # no comparison claimed without timm
    rows = [line for line in out.splitlines() if line.startswith("astronaut-flip")]
    assert len(rows) == 1 and len(rows[0].split()) == 1 + len(demo.SAMPLES)
