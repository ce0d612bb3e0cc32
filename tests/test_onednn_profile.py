"""benchmarks/onednn_profile.py: its reading of oneDNN's verbose lines, and one real
run of timm's side (oneDNN prints what it executes; the profile finds the convolutions)."""

import pytest
from conftest import benchmark_script


@pytest.mark.once("torch")
def test_verbose_lines_are_summed_per_kind_and_implementation():
    lines = [
        "onednn_verbose,v1,info,oneDNN v3.7.1 (commit 8d263e6)",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv:avx512_core_amx_bf16,"
        "forward_inference,src:bf16::blocked:acdb::f0,,alg:convolution_direct,mb8_ic40oc160,0.5",
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv:avx512_core_amx_bf16,"
        "forward_inference,src:bf16::blocked:acdb::f0,,alg:convolution_direct,mb8_ic160oc40,0.25",
        "onednn_verbose,v1,primitive,create:cache_hit,cpu,matmul,gemm:jit,undef,,,,2x3:3x4,0.01",
        "dnnl_verbose,exec,cpu,reorder,jit:uni,undef,src_f32::blocked:abcd::f0,,,8x3x4x4,0.125",
        "not a verbose line,exec,cpu,convolution,x,9.0",
    ]
    totals = benchmark_script("onednn_profile").parse_verbose(lines)
    assert totals == {
        ("convolution", "brgconv:avx512_core_amx_bf16"): 0.75,
        ("reorder", "jit:uni"): 0.125,
    }


@pytest.mark.once("torch")
def test_a_timm_profile_finds_its_convolutions(tmp_path):
    module = benchmark_script("onednn_profile")
    output = tmp_path / "profile.md"
    argv = ["--side", "timm", "--variant", "convnext_atto", "--batch-size", "1"]
    argv += ["--resolution", "64", "--dtype", "float32", "--passes", "2", "--warmup", "1"]
    (profile,) = module.main([*argv, "--output", str(output)])
    convolutions = sum(
        ms for (kind, _), ms in profile["onednn_ms"].items() if kind == "convolution"
    )
    assert profile["wall_ms"] > 0 and convolutions > 0
    assert 0 < sum(profile["onednn_ms"].values()) <= 1.5 * profile["wall_ms"]
    assert "| timm |" in output.read_text()
