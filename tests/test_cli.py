"""The command lines (embedding.cli): every bad input one `error:` line with a non-zero
exit, never a traceback; cheap checks before any model loads; pipes and devices refused
unread.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import SIZE, TINY_CFG, bad_files, photo
from PIL import Image

import weights_convert
from embedding import cli as embedding_cli
from embedding import load_image
from embedding.errors import (
    ImageLoadError,
    PairsFileError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Command lines: one `error:` line, non-zero exit, never a traceback
# ----------------------------------------------------------------------------


def test_cli_max_pixels(lfw_people, tiny_keras, tmp_path, capsys):
    root, _ = lfw_people
    argv = ["embed", root, "-o", tmp_path / "v.npz", "--model", tiny_keras, "--max-pixels"]
    code, _, err = run_cli([*argv, "100"], capsys)
    assert_one_error_line(code, err, "none of the 12 images")
    assert "max_pixels" in err and not (tmp_path / "v.npz").exists()
    code, _, err = run_cli([*argv, "0"], capsys)
    assert_one_error_line(code, err, "--max-pixels")


def run_cli(argv, capsys):
    """`python -m embedding ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = embedding_cli.main([str(a) for a in argv])
    except SystemExit as error:  # argparse
        code = error.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err, *fragments):
    """Exit status 2 and one line starting with `error:`: no argparse usage block or
    `PROG: error:` line, no traceback."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and "usage:" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_cli_bad_models_name_the_model_option(bad_models, lfw_people, tmp_path, capsys):
    root, pairs = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    for source, fragment in bad_models:
        for argv in (
            ["embed", root, "-o", tmp_path / "v.npz"],
            ["verify", image, image],
            ["evaluate", pairs, "--root", root],
            ["finetune", root, "-o", tmp_path / "t.keras"],
        ):
            code, _, err = run_cli([*argv, "--model", source, "--no-cache"], capsys)
            assert_one_error_line(code, err, "--model", fragment)
    assert not (tmp_path / "v.npz").exists() and not (tmp_path / "t.keras").exists()
    code, _, err = run_cli(["demo", "--model", bad_models[0][0]], capsys)
    assert_one_error_line(code, err, "--model", "no such file")


def test_cli_reads_its_own_keras_outputs(tiny_keras, lfw_people, tmp_path, capsys):
    """`--model tuned.keras` (finetune's output) works; refused: --pooling with it."""
    root, pairs = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    code, out, err = run_cli(["verify", image, image, "--model", tiny_keras], capsys)
    assert code == 0 and "SAME" in out, err
    out_path = tmp_path / "v.npz"
    code, _, err = run_cli(
        ["embed", root, "-o", out_path, "--model", tiny_keras, "--pooling", "max"], capsys
    )
    assert_one_error_line(code, err, "--pooling")


@pytest.mark.slow
def test_cli_embeds_with_a_converted_classifier(lfw_people, tmp_path, capsys):
    """A `weights_convert` .keras with its classifier gives timm's pre-logits."""
    root, _ = lfw_people
    classifier_path = str(tmp_path / "classifier.keras")
    from convnext_v2 import create_convnext_v2

    classifier = create_convnext_v2("atto", num_classes=7, input_shape=(SIZE, SIZE, 3))
    classifier.pretrained_cfg = dict(TINY_CFG)
    weights_convert.save_converted(classifier, classifier_path)
    out_path = tmp_path / "v.npz"
    code, out, err = run_cli(["embed", root, "-o", out_path, "--model", classifier_path], capsys)
    assert code == 0, err
    with np.load(out_path) as data:  # timm's pre-logits (320), not the 7 logits
        assert data["embeddings"].shape[1] == 320


def test_cli_outputs_are_checked_before_the_model_loads(
    lfw_people, tiny_keras, tmp_path, unwritable_dir, monkeypatch, capsys
):
    root, pairs = lfw_people

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(embedding_cli.options, "make_embedder", no_model)
    monkeypatch.setattr(embedding_cli.options, "check_model_source", no_model)
    (tmp_path / "a_file").write_text("x")
    model = ["--model", tiny_keras]
    cases = [
        (["embed", root, "-o", tmp_path / "v.csv"], "-o", "names none"),
        (["embed", root, "-o", os.path.join(unwritable_dir, "v.npz")], "-o", "cannot write"),
        (["embed", root, "-o", tmp_path / "a_file" / "v.npz"], "-o", "is a file"),
        (["embed", root, tmp_path / "nothere", "-o", tmp_path / "v.npz"], "nothere", "no such"),
        (["evaluate", pairs, "--root", root, "--json", tmp_path], "--json", "is a folder"),
        (
            ["evaluate", pairs, "--root", root, "--json", os.path.join(unwritable_dir, "m.json")],
            "--json",
            "cannot write",
        ),
        (["evaluate", pairs, "--root", tmp_path / "wrong"], "--root", "no such folder"),
        (["finetune", root, "-o", tmp_path / "w.weights.h5"], "-o", ".keras"),
        (["finetune", root, "-o", os.path.join(unwritable_dir, "t.keras")], "-o", "cannot write"),
        (["finetune", tmp_path / "nodata", "-o", tmp_path / "t.keras"], "DATA_DIR", "no such"),
        (["verify", root, root], "image1", "folder"),
        (["verify", tmp_path / "x.jpg", tmp_path / "y.jpg"], "image1", "no such file"),
    ]
    for argv, *fragments in cases:
        code, _, err = run_cli([*argv, *model], capsys)
        assert_one_error_line(code, err, *fragments)


def test_cli_usage_errors_are_one_error_line(lfw_people, tiny_keras, tmp_path, capsys):
    """argparse's own refusals (bad values, unknown options or commands, missing
    arguments) read like every other error, in both command lines."""
    root, _ = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    out = ["-o", tmp_path / "v.npz"]
    cases = [
        (["embed", root, *out, "--batch-size", "0"], "--batch-size", "at least 1"),
        (["embed", root, *out, "--batch-size", "1e9"], "--batch-size", "whole number"),
        (["embed", root, *out, "--workers", "-1"], "--workers"),
        (["embed", root, *out, "--no-such-option"], "--no-such-option"),
        (["embed", root], "-o/--output", "embed --help"),
        (["verify", image, image, "--threshold", "1e400"], "--threshold", "finite"),
        (["identify", image, "--gallery", root, "--threshold", "nan"], "--threshold", "finite"),
        (["--backend", "foo", "embed", root, *out], "--backend", "'jax'"),
        (["nosuchcommand"], "nosuchcommand", "'embed'"),
        ([], "COMMAND"),
    ]
    for argv, *fragments in cases:
        code, _, err = run_cli([*argv, "--model", tiny_keras] if argv else argv, capsys)
        assert_one_error_line(code, err, *fragments)
    from weights_convert import cli as convert_cli

    for argv, fragment in (
        (["x", "-o", tmp_path / "m.keras", "--num-classes", "1.5"], "--num-classes"),
        ([], "-o/--output"),
    ):
        try:
            code = convert_cli.main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code
        assert_one_error_line(code, capsys.readouterr().err, fragment, "weights_convert --help")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_pipes_and_devices_are_refused_not_read(
    lfw_people, tiny_embedder, tiny_keras, tmp_path, capsys
):
    """A named pipe would block the reader until a writer comes (forever), a device such
    as /dev/zero never ends: both are refused by kind, per image, without reading."""
    root, _ = lfw_people
    good = os.path.join(root, "alice", "alice_0001.jpg")
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(good, folder / "good.jpg")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(os.devnull, folder / "device.png")
    expected = {"pipe.jpg": "named pipe", "device.png": "character device"}

    def timeout(signum, frame):
        raise AssertionError("reading blocked")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        for name, kind in expected.items():
            with pytest.raises(ImageLoadError, match=kind):
                load_image(str(folder / name))
        inputs = sorted(map(str, folder.iterdir()))  # device.png, good.jpg, pipe.jpg
        result = tiny_embedder.embed_many(inputs)
        code, _, err = run_cli(["verify", os.devnull, good, "--model", tiny_keras], capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.indices.tolist() == [1] and result.skipped == [0, 2]
    assert "character device" in str(result.failures[0]) and "pipe" in str(result.failures[1])
    assert_one_error_line(code, err, "image1", "character device")


def test_cli_pairs_files(lfw_people, tiny_keras, tmp_path, capsys):
    root, good_pairs = lfw_people
    cases = {
        "1 2\nalice 1 2\nalice 1 bob 1\n": ("pairs.txt:1", "1 fold"),
        "10 300\nalice 1 2\nalice 1 bob 1\n": ("6000", "found 2"),
        "2 1\nalice 1 2\nalice 1\nbob 1 2\nalice 1 bob 1\n": ("pairs.txt:3", "name1 n1"),
        "alice one two\nalice 1 bob 1\n": ("pairs.txt:1", "'one'"),
        "../etc 1 2\nalice 1 bob 1\n": ("pairs.txt:1", "folder name"),
        "alice 1 2\nalice 1 3\n": ("2 same-person and 0 different",),
        "\n\n": ("empty pairs file",),
        "alice 1 2\nalice 1 bob 9\ndave 1 2\nalice 2 bob 1\n": ("3 image(s)", "bob_0009", "--root"),
    }
    path = tmp_path / "pairs.txt"
    for text, fragments in cases.items():
        path.write_text(text)
        code, out, err = run_cli(["evaluate", path, "--root", root, "--model", tiny_keras], capsys)
        assert_one_error_line(code, err, *fragments)
        assert "model:" not in out  # refused before anything was embedded
    path.write_bytes(b"\xff\xfe\x00 binary")
    code, _, err = run_cli(["evaluate", path, "--root", root], capsys)
    assert_one_error_line(code, err, "UTF-8")
    with pytest.raises(PairsFileError, match="pairs.txt:1"):
        path.write_text("1 2\nalice 1 2\nbob 1 2\n")
        embedding_cli.read_pairs(path, root)
    for flag in (["--folds", "1"], ["--folds", "x"]):  # argparse: exit 2, one line
        code, _, err = run_cli(["evaluate", good_pairs, "--root", root, *flag], capsys)
        assert_one_error_line(code, err, "--folds")

    report = tmp_path / "m.json"
    missing = tmp_path / "missing_pairs.txt"
    missing.write_text("alice 1 2\nalice 1 bob 1\nbob 1 3\nbob 2 cat 3\ncat 1 eve 1\n")
    argv = ["evaluate", missing, "--root", root, "--model", tiny_keras, "--folds", "2"]
    code, out, err = run_cli([*argv, "--skip-missing", "--json", report], capsys)
    assert code == 0, err
    assert "1 image(s) missing" in err and "1 of 5 pairs dropped" in err and "EER" in out
    assert json.loads(report.read_text())["n_genuine"] == 2


def test_cli_evaluate_skips_unreadable_images(lfw_people, tiny_keras, tmp_path, capsys):
    """An unreadable image drops its pairs with one "skipped: PATH: REASON" line (the
    same line `embed` and `enroll` print) and a count; the rest is evaluated."""
    root = tmp_path / "people"
    shutil.copytree(lfw_people[0], root)
    broken = root / "bob" / "bob_0003.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("alice 1 2\nalice 1 bob 1\nbob 1 3\nbob 2 cat 3\ncat 1 2\n")
    argv = ["evaluate", pairs, "--root", root, "--model", tiny_keras, "--folds", "2"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped: {broken}: "), err
    assert "1 image(s) unreadable, 1 of 5 pairs dropped" in err and "EER" in out


def test_cli_verify_threshold_and_nan(lfw_people, nan_keras, tiny_keras, capsys):
    root, _ = lfw_people
    image = os.path.join(root, "alice", "alice_0001.jpg")
    for threshold in ("nan", "inf", "-inf", "abc"):
        code, out, err = run_cli(
            ["verify", image, image, "--model", tiny_keras, "--threshold", threshold], capsys
        )
        assert_one_error_line(code, err, "--threshold")
        assert "verdict" not in out
    code, out, err = run_cli(["verify", image, image, "--model", nan_keras], capsys)
    assert_one_error_line(code, err, "NaN")
    assert "verdict" not in out and "DIFFERENT" not in out


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    argv = ["embed", tmp_path / "missing", "-o", tmp_path / "v.npz"]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, "missing", "no such file")
    with pytest.raises(embedding_cli.CommandError, match="no such file"):
        embedding_cli.main(["--debug", *map(str, argv)])


def test_cli_all_images_unreadable_writes_nothing(tmp_path, tiny_keras, capsys):
    bad_files(tmp_path / "bad", 6)
    out = tmp_path / "v.npz"
    code, _, err = run_cli(["embed", tmp_path / "bad", "-o", out, "--model", tiny_keras], capsys)
    assert_one_error_line(code, err, "none of the 6 images")
    assert err.count("skipped:") == 6 and not out.exists()


@pytest.mark.slow
def test_cli_errors_in_a_real_process_have_no_traceback(bad_models, tmp_path):
    """`python -m embedding` itself (not `main` in this process): one line, exit 2."""
    truncated = bad_models[1][0]
    Image.fromarray(photo("coffee")).save(tmp_path / "coffee.png")
    procs = [
        ["embed", tmp_path, "-o", tmp_path / "v.npz", "--model", truncated, "--no-cache"],
        ["evaluate", tmp_path / "none.txt", "--root", tmp_path],
    ]
    for argv in procs:
        proc = subprocess.run(
            [sys.executable, "-m", "embedding", *map(str, argv)],
            env={**os.environ, "PYTHONPATH": ROOT},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
