"""convnext_common: the one writer leaves nothing behind, the one output check, the JSON
sanitiser, the exit policy of both command lines and the allocator settings
(standard library + numpy only)."""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
import pytest

from convnext_common import allocator, cpu
from convnext_common.cli import (
    CommandError,
    finite_float,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from convnext_common.errors import InputError, OutputPathError
from convnext_common.files import atomic_path, atomic_write_text, check_output_path
from convnext_common.jsonable import jsonable

pytestmark = pytest.mark.once("jax")  # no Keras backend involved


def test_companion_files_of_a_write_never_outlive_it(tmp_path):
    """What a writer leaves beside the temporary file under its name (an exporter's
    external data) is removed; a declared companion moves to the target's name."""
    target = tmp_path / "model.onnx"
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"graph")
        with open(tmp + ".data", "wb") as f:  # as jax2onnx's external data
            f.write(b"weights")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]

    xml = tmp_path / "model.xml"
    with atomic_path(xml, companions=(".bin",)) as tmp:
        with open(tmp, "w") as f:
            f.write("<net/>")
        with open(tmp[: -len(".xml")] + ".bin", "wb") as f:  # OpenVINO's weights
            f.write(b"weights")
    assert sorted(os.listdir(tmp_path)) == ["model.bin", "model.onnx", "model.xml"]
    assert (tmp_path / "model.bin").read_bytes() == b"weights"


def test_a_failed_write_leaves_nothing_and_the_old_file_whole(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("new, half")
        with open(tmp + ".part", "w") as f:
            f.write("x")
        raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]
    assert target.read_text() == "old"


def test_one_output_check_for_both_packages(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for path, fragment in [
        (tmp_path, "is a folder"),
        (tmp_path / "a_file" / "out.keras", "is not a folder"),
        ("", "empty"),
    ]:
        with pytest.raises(OutputPathError, match=fragment) as info:
            check_output_path(path, option="-o")
        assert isinstance(info.value, (InputError, ValueError))
    with pytest.raises(OutputPathError, match=r"must end in \.keras or \.weights\.h5"):
        check_output_path(tmp_path / "x.pt", suffixes=(".keras", ".weights.h5"))


def test_jsonable_makes_plain_json():
    value = {
        1: (np.float32(0.5), np.int64(3)),
        "array": np.arange(3),
        "nan": math.nan,
        "flag": np.bool_(True),
        "dtype": np.dtype("float32"),
    }
    out = jsonable(value)
    assert json.loads(json.dumps(out)) == {
        "1": [0.5, 3],
        "array": [0, 1, 2],
        "nan": None,
        "flag": True,
    }
    assert jsonable(value, unknown="str")["dtype"] == "float32"
    with pytest.raises(TypeError, match="dtype"):
        jsonable(value, unknown="raise")


@pytest.mark.parametrize(
    "error, status, fragment",
    [
        (CommandError("--x: bad"), 2, "error: --x: bad"),
        (FileNotFoundError(2, "No such file or directory", "a.jpg"), 2, "error: No such file"),
        (MemoryError(), 1, "error: out of memory"),
        (KeyError("bug"), 1, "error: unexpected KeyError"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_exit_policy_is_one_error_line(error, status, fragment, capsys):
    def handler(args):
        raise error

    assert run_command(handler, None) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(fragment), err
    with pytest.raises(type(error)):
        run_command(handler, None, debug=True)


# ----------------------------------------------------------------------------
# Output paths: refused before any work
# ----------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(tmp_path, unwritable_dir):
    (tmp_path / "a_file").write_text("x")
    cases = [
        (str(tmp_path), "is a folder"),
        (str(tmp_path / "a_file" / "out.npz"), "is a file, not a folder"),
        (os.path.join(unwritable_dir, "out.npz"), "cannot write"),
        ("", "empty"),
    ]
    for path, fragment in cases:
        with pytest.raises(OutputPathError, match=fragment):
            check_output_path(path, option="-o")
    with pytest.raises(OutputPathError, match=r"end in \.keras"):
        check_output_path(str(tmp_path / "w.weights.h5"), suffixes=(".keras",))
    deep = tmp_path / "new" / "deeper" / "out.npz"
    assert check_output_path(deep) == str(deep) and not deep.parent.exists()


@pytest.mark.parametrize(
    "kind,text,value,refusal",
    [
        (positive_int, "3", 3, None),
        (positive_int, "0", None, "at least 1"),
        (positive_int, "1e9", None, "whole number"),
        (non_negative_int, "0", 0, None),
        (non_negative_int, "-1", None, "at least 0"),
        (finite_float, "-2.5", -2.5, None),
        (finite_float, "nan", None, "finite"),
        (positive_float, "0.5", 0.5, None),
        (positive_float, "0", None, "more than 0"),
        (positive_float, "inf", None, "finite"),
        (non_negative_float, "0", 0.0, None),
        (non_negative_float, "2.5", 2.5, None),
        (non_negative_float, "-0.1", None, "at least 0"),
        (non_negative_float, "inf", None, "finite"),
        (non_negative_float, "nan", None, "finite"),
        (non_negative_float, "ms", None, "expected a number"),
    ],
)
def test_argument_types_take_their_values_and_name_the_refusal(kind, text, value, refusal):
    """The command lines' argument types (argparse turns a refusal into one `error:` line)."""
    if refusal is None:
        assert kind(text) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=refusal):
            kind(text)


def test_allocator_env_names_what_configures_the_allocator():
    environ = {
        "MALLOC_ARENA_MAX": "2",
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1",
        "LD_PRELOAD": "libjemalloc.so.2",
        "PATH": "/bin",
        "MY_MALLOC_": "x",
    }
    assert allocator.allocator_env(environ) == {
        "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1",
        "LD_PRELOAD": "libjemalloc.so.2",
        "MALLOC_ARENA_MAX": "2",
    }
    assert allocator.allocator_env({"PATH": "/bin"}) == {}


def test_raise_malloc_thresholds_says_why_it_could_not(monkeypatch):
    if allocator._glibc() is None:
        pytest.skip("glibc's malloc thresholds: a glibc system")
    set_values = []
    monkeypatch.setattr(allocator, "_mallopt", lambda libc, p, v: set_values.append((p, v)) or 0)
    with pytest.raises(OSError, match="refused M_MMAP_THRESHOLD"):
        allocator.raise_malloc_thresholds()
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with pytest.raises(OSError, match="not glibc"):
        allocator.raise_malloc_thresholds()
    assert not allocator.glibc_malloc_in_use()


@pytest.mark.parametrize(
    "text, flags, native",
    [
        ("processor : 0\nflags : fpu sse avx512f avx512_bf16\n", {"avx512_bf16"}, True),
        ("flags\t\t: fpu avx512f amx_bf16 amx_tile\nflags : x\n", {"amx_bf16"}, True),
        ("flags : fpu sse2 avx2 avx512f avx512_vnni\n", {"avx512f"}, False),
        ("processor : 0\nFeatures : fp asimd bf16 i8mm\n", {"bf16"}, True),
        ("Features : fp asimd\n", {"asimd"}, False),
        ("processor : 0\nmodel name : a CPU\n", None, None),
    ],
)
def test_cpu_flags_say_whether_bfloat16_is_native(text, flags, native, tmp_path, monkeypatch):
    """x86's "flags" and Arm's "Features" line, the first CPU's only; a file without
    either says nothing (None, not False: unknown is not "absent")."""
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    read = cpu.flags_of_cpuinfo(path)
    assert (read is None) == (flags is None)
    if flags is not None:
        assert flags <= read and "x" not in read  # the first line only
    monkeypatch.setattr(cpu, "cpu_flags", lambda: read)
    assert cpu.has_bfloat16_instructions() is native
    assert cpu.flags_of_cpuinfo(tmp_path / "missing") is None
