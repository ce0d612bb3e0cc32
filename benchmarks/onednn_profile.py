"""Where an inference pass spends its time in oneDNN, the kernel library under timm's
PyTorch and under TensorFlow's and PyTorch's Keras backends on x86 CPUs.

    python benchmarks/onednn_profile.py --variant convnext_atto --batch-size 8 \\
        --dtype bfloat16 --side timm,keras-tensorflow,keras-torch

Each side runs in its own subprocess (benchmark.py's workers build the same models on
the same batch) with `ONEDNN_VERBOSE=profile_exec`, which makes oneDNN print one line
per primitive it executes, with its kind, its implementation (for example
`brgconv:avx512_core_amx_bf16`: AMX tiles) and its time. After the warm-up passes the
worker times `--passes` passes; the lines printed during them are summed per
(primitive kind, implementation). Reported per side: the wall time of a pass, the
time in oneDNN primitives by kind and implementation, and the rest (the framework's
own kernels: element-wise ops, GELU, casts outside oneDNN; Python and dispatch).

JAX is not profiled here: XLA's CPU backend does not call oneDNN for these models.
The verbose printing adds a little to every primitive, so wall times here are a bit
above benchmark.py's; compare sides within one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402  (benchmark.py beside this file: the same workers and batch)

SIDES = {
    "timm": ("timm", None),
    "timm-compile": ("timm-compile", None),
    "keras-tensorflow": ("keras", "tensorflow"),
    "keras-torch": ("keras", "torch"),
}
BEGIN, END = "@@PROFILE begin", "@@PROFILE end"


def _worker(args) -> None:
    """Build the side's forward, warm up, then time `passes` passes between markers."""
    worker = benchmark.WORKERS[args.worker]
    forward, _info = worker(args)
    for _ in range(args.warmup):
        forward()
    times = []
    print(BEGIN, flush=True)
    for _ in range(args.passes):
        start = time.perf_counter()
        forward()
        times.append(time.perf_counter() - start)
    print(END, flush=True)
    print("@@TIMES " + json.dumps(times), flush=True)


def parse_verbose(lines) -> dict:
    """{(kind, implementation): total ms} of oneDNN's `exec` lines (format v1:
    onednn_verbose,v1,primitive,exec,cpu,KIND,IMPL,PROP,MEMORY,ATTRS,AUX,PROBLEM,MS;
    older lines lack the `v1,primitive` fields: the kind is found after `cpu`)."""
    totals = collections.defaultdict(float)
    for line in lines:
        if not line.startswith(("onednn_verbose", "dnnl_verbose")) or ",exec," not in line:
            continue
        fields = line.strip().split(",")
        try:
            at = fields.index("cpu")
            milliseconds = float(fields[-1])
        except ValueError:
            continue
        totals[(fields[at + 1], fields[at + 2])] += milliseconds
    return dict(totals)


def profile_side(side: str, args) -> dict:
    worker, backend = SIDES[side]
    env = dict(os.environ, ONEDNN_VERBOSE="profile_exec", DNNL_VERBOSE="profile_exec")
    if backend:
        env["KERAS_BACKEND"] = backend
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        worker,
        "--variant",
        args.variant,
        "--batch-size",
        str(args.batch_size),
        "--dtype",
        args.dtype,
        "--resolution",
        str(args.resolution),
        "--passes",
        str(args.passes),
        "--warmup",
        str(args.warmup),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"error: {side} failed:\n{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    start, end = lines.index(BEGIN), lines.index(END)
    times = json.loads(next(line for line in lines if line.startswith("@@TIMES "))[8:])
    per_pass = {k: v / args.passes for k, v in parse_verbose(lines[start + 1 : end]).items()}
    wall_ms = 1e3 * sorted(times)[len(times) // 2]
    return {"side": side, "wall_ms": wall_ms, "onednn_ms": per_pass}


def markdown(profiles, args) -> str:
    lines = [
        f"{args.variant}, batch {args.batch_size}, {args.dtype}, {args.resolution}x"
        f"{args.resolution}: milliseconds per "
        f"pass (median wall time of {args.passes} passes; oneDNN's time averaged).",
        "",
        "| side | wall ms | in oneDNN ms | outside oneDNN ms | oneDNN primitives (ms) |",
        "|---|---:|---:|---:|---|",
    ]
    for p in profiles:
        inside = sum(p["onednn_ms"].values())
        top = sorted(p["onednn_ms"].items(), key=lambda kv: -kv[1])
        text = "; ".join(f"{kind} {impl} {ms:.1f}" for (kind, impl), ms in top if ms >= 0.05)
        lines.append(
            f"| {p['side']} | {p['wall_ms']:.1f} | {inside:.1f} | "
            f"{max(p['wall_ms'] - inside, 0.0):.1f} | {text} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="convnext_atto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--side", default="timm,keras-tensorflow,keras-torch")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--output", default=None, help="also write the table here (.md)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device, args.call = "cpu", "predict_batch"
    if args.worker:
        args.backend = os.environ.get("KERAS_BACKEND")
        return _worker(args)
    sides = [s.strip() for s in args.side.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        p.error(f"unknown side(s) {bad}; choose from {', '.join(SIDES)}")
    profiles = [profile_side(side, args) for side in sides]
    text = markdown(profiles, args)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return profiles


if __name__ == "__main__":
    main()
