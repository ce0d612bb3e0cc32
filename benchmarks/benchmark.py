"""Inference speed and memory of the Keras ConvNeXt models against timm (PyTorch eager).

    python benchmarks/benchmark.py --variant convnext_atto,convnextv2_atto,convnext_tiny \\
        --backend all --batch-size 1,8,32 --resolution 224 \\
        --call predict_batch,predict_on_batch --xla-flags auto

(docs/performance.md's tables: every variant at batch 1, 8 and 32, both Keras inference
entry points, and JAX once more with the XLA CPU flags measured to help it.) Round
three's tables add timm + torch.compile and run once per dtype:

    python benchmarks/benchmark.py --variant convnext_atto,convnextv2_atto,convnext_tiny \\
        --backend all --batch-size 1,8,32 --timm-compile --dtype bfloat16 \\
        --output benchmarks/results/cpu_r224_bfloat16

For every variant it times our model on each requested Keras backend and timm's
model, each side in its own worker subprocess (one framework per process: a
second framework's idle thread pools distort the other's timings). The workers
build and warm up once (compilation happens there), then the parent asks them in
turn for a round of timed forward passes, alternating keras/timm round by round,
so slow drifts of a shared machine's load hit both sides alike. Reported per
side: the median and spread of all timed passes, images/s, the ratio to timm,
achieved GFLOP/s and the worker's peak resident memory. The table is printed and
written as JSON and Markdown to benchmarks/results/ (or --output).

What is timed
  keras: per --call, on a NumPy batch:
         predict_batch     `ConvNeXt.predict_batch(x)`, the light inference entry
                           point `Embedder` uses (a cached jit on JAX, a
                           tf.function per shape on TensorFlow, the eager call
                           under inference_mode on torch);
         predict_on_batch  Keras' `model.predict_on_batch(x)`;
         call              `model(x, training=False)` on a backend tensor.
         With several --call values each is its own worker and row.
  XLA flags: --xla-flags FLAGS adds a row "keras-jax +XLA_FLAGS": a JAX worker
         whose environment has XLA_FLAGS=FLAGS (process-wide XLA CPU options a
         user can set; the library never sets them). "auto": the flags
         documented in docs/performance.md (XLA_FLAGS_MEASURED below).
  allocator: every worker inherits this process's environment, so glibc's
         malloc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
         GLIBC_TUNABLES) or an LD_PRELOAD-ed allocator given to the benchmark
         apply to every side alike, timm's too; the report records them and the
         table names them (`allocator_env`). The library sets no environment
         variable; on PyTorch it raises glibc's malloc thresholds in its own
         process at predict_batch's first call on a CPU (`torch_keep_freed_memory`,
         not where the environment sets any of these): each worker reports whether
         it did, and the table's caption names the sides that did.
  timm:  `model(x)` on a torch tensor under `torch.inference_mode()`, eager,
         NCHW, i.e. timm used as shipped.
  timm +compile (--timm-compile): the same model through `torch.compile(model)`
         (inductor, default mode), timm at its fastest as a user runs it. Its
         compilation happens in the worker's first warm-up pass and is reported
         apart ("first call"), never inside the timed passes.
  dtype: --dtype bfloat16 times every side in bfloat16: timm's model and input
         `.to(torch.bfloat16)`, ours built with `dtype="bfloat16"` (the body in
         bfloat16, normalisation statistics and the head in float32), fed the
         float32 batch as `Embedder` does. Ratios are always to timm of the same
         dtype.
  Both get the same batch (same values; NHWC for Keras, NCHW for timm), the
  same dtype and randomly initialised weights (speed does not depend on the
  values). The NumPy -> framework conversion is part of the Keras timing.

FLOPs
  An analytic count of the architecture's multiply-accumulates (`macs()`):
  the stem, downsampling, depthwise 7x7 and pointwise (1x1) convolutions and
  the classifier; normalisations, GELU, GRN and the residual adds are left
  out (< 1 % of the total). It equals torch.utils.flop_counter's count on the
  timm model (convnext_tiny at 224: 4.46 GMACs). GFLOP/s = 2 x MACs x images/s.
  The fraction of this CPU's peak divides that by `cpu_peak_gflops` (cores x
  clock x FLOPs per cycle of the widest FMA / dot-product instructions the CPU
  reports; its derivation is written into the results).

First call
  The first warm-up pass of each worker, timed on its own: JAX's jit
  compilation, TensorFlow's tracing, torch.compile's compilation (timm
  +compile), or nothing much (eager). Reported per row, apart from the timed
  passes.

Peak memory
  `ru_maxrss` of the worker process (RSS high-water mark: framework, model,
  compilation and activations together); each (variant, batch size) gets fresh
  workers, so it is the peak of that batch size. The ratio to timm's worker is
  reported too.

Batch sizes
  --batch-size 1,8,32 runs the whole comparison once per batch size (fresh
  workers each time); batch 1 is single-image latency (the median pass).

Cold-start mode (--cold-start): a whole process that embeds one image, as a user or
a service start pays it: interpreter start, imports, loading the checkpoint, the
first embedding, writing it. Ours is the command line itself,
`python -m embedding embed IMG -o OUT.npz --model CKPT`, per backend, with
--no-cache (read the safetensors, port) and with the converted model (and, on JAX,
the compiled executable) from a cache filled by one untimed run; timm's is the
equivalent script (import timm, create the model, load the safetensors, eval
transform, forward, L2, save). Each run is its own subprocess, the sides
alternate run by run for --rounds rounds, and the median wall time is reported
with the 1-minute load average before each run. One more run per side reports
where the time goes (import, load, first embedding, ...).

End-to-end mode (--images FOLDER): `embedding.Embedder(source).embed(paths)`
over the JPEGs of a folder against timm's eval transform + model on the same
files (image decoding and resizing included). Needs the `embedding` package and
a checkpoint (--source, a folder in Hub layout or a Hub id); skipped otherwise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# every worker inherits the benchmark's environment, so its allocator settings too:
# a run made with any is labelled with them
from convnext_common.allocator import ALLOCATOR_ENV_PREFIXES, allocator_env  # noqa: E402, F401
from convnext_common.cpu import cpu_flags  # noqa: E402

PROTOCOL = "@@BENCH "
BACKENDS = ("jax", "tensorflow", "torch")
CALLS = ("predict_batch", "predict_on_batch", "call")
MAX_PASSES_PER_ROUND = 200  # --min-round-seconds never asks for more passes than this
# XLA CPU options measured to help the JAX backend on this project's models (docs/performance.md,
# "Performance"); `--xla-flags auto` benchmarks JAX with them as an extra row.
XLA_FLAGS_MEASURED = "--xla_cpu_experimental_ynn_fusion_type="

# (depths, widths) of every variant, as timm's convnext_<v> / convnextv2_<v>. A copy of
# convnext_v1/v2.VARIANTS (tests/test_benchmark.py checks they agree): the parent process
# must not import Keras, whose backend would start thread pools beside the workers.
_SIZES = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "xlarge": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def parse_variant(name: str) -> tuple[str, str]:
    """'convnext_tiny' -> ('v1', 'tiny'); 'convnextv2_atto' -> ('v2', 'atto')."""
    family, _, size = name.lower().partition("_")
    if family not in ("convnext", "convnextv2") or size not in _SIZES:
        raise ValueError(
            f"Unknown variant {name!r}: expected convnext_<size> or convnextv2_<size> with "
            f"size in {', '.join(_SIZES)}."
        )
    return ("v2" if family == "convnextv2" else "v1"), size


def macs(variant: str, resolution: int, num_classes: int = 1000) -> int:
    """Multiply-accumulates of one forward pass (see the module docstring)."""
    _, size = parse_variant(variant)
    depths, widths = _SIZES[size]
    side = resolution // 4
    total = side * side * (4 * 4 * 3) * widths[0]  # stem 4x4 stride 4
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        if stage > 0:
            side //= 2
            total += side * side * (2 * 2 * widths[stage - 1]) * width  # downsample 2x2/2
        hw = side * side
        per_block = hw * 49 * width + 2 * hw * width * 4 * width  # dw 7x7 + two 1x1
        total += depth * per_block
    return total + widths[-1] * num_classes


# ----------------------------------------------------------------------------
# Workers (one framework per process)
# ----------------------------------------------------------------------------


def _send(obj):
    sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _peak_rss_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024.0 * 1024.0) if sys.platform == "darwin" else kb / 1024.0


def _input_batch(batch: int, resolution: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, resolution, resolution, 3)).astype("float32")


def _keras_forward(args):
    """Build our model on KERAS_BACKEND and return a callable running one batch."""
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    from convnext_v1 import create_convnext_v1
    from convnext_v2 import create_convnext_v2

    family, size = parse_variant(args.variant)
    create = create_convnext_v2 if family == "v2" else create_convnext_v1
    # bfloat16: the body in bfloat16, norm statistics and the head in float32 (what
    # Embedder(dtype="bfloat16") runs); the float32 batch is converted inside
    model = create(size, input_shape=(args.resolution, args.resolution, 3), dtype=args.dtype)
    x = _input_batch(args.batch_size, args.resolution)

    if args.call == "predict_batch":

        def forward():
            return model.predict_batch(x)

    elif args.call == "predict_on_batch":

        def forward():
            return model.predict_on_batch(x)

    else:
        if args.backend == "torch":
            import torch

            tx = keras.ops.convert_to_tensor(x)

            def forward():
                with torch.no_grad():
                    out = model(tx, training=False)
                if out.is_cuda:
                    torch.cuda.synchronize()
                return out

        else:
            tx = keras.ops.convert_to_tensor(x)

            def forward():
                return np.asarray(keras.ops.convert_to_numpy(model(tx, training=False)))

    info = {
        "framework": f"keras {keras.__version__} / {keras.backend.backend()}",
        "backend_version": _backend_version(keras.backend.backend()),
        "params": int(model.count_params()),
    }
    return forward, info


def _backend_version(backend):
    if backend == "jax":
        import jax

        return f"jax {jax.__version__} ({jax.default_backend()})"
    if backend == "tensorflow":
        import tensorflow as tf

        return f"tensorflow {tf.__version__}"
    import torch

    return f"torch {torch.__version__}"


def _timm_forward(args, compiled=False):
    import timm
    import torch

    device = "cuda" if args.device == "gpu" else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = timm.create_model(args.variant, pretrained=False).eval().to(device, dtype)
    if compiled:  # compiles on the first call (the worker's first warm-up pass)
        model = torch.compile(model)
    x = torch.from_numpy(_input_batch(args.batch_size, args.resolution).transpose(0, 3, 1, 2))
    x = x.contiguous().to(device, dtype)

    def forward():
        with torch.inference_mode():
            out = model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    info = {
        "framework": f"timm {timm.__version__} ({'torch.compile' if compiled else 'eager'})",
        "backend_version": f"torch {torch.__version__}",
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    return forward, info


def _timm_compiled_forward(args):
    return _timm_forward(args, compiled=True)


def _image_paths(folder):
    exts = (".jpg", ".jpeg", ".png")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(exts))


def _keras_e2e(args):
    """`Embedder(source).embed(paths)` over the whole folder per pass."""
    sys.path.insert(0, ROOT)
    import keras

    from embedding import Embedder

    paths = _image_paths(args.images)
    embedder = Embedder(args.source, batch_size=args.batch_size)

    def forward():
        return embedder.embed(paths)

    info = {
        "framework": f"keras {keras.__version__} / {keras.backend.backend()} Embedder",
        "backend_version": _backend_version(keras.backend.backend()),
        "params": 0,
        "images": len(paths),
    }
    return forward, info


def _timm_e2e(args):
    """timm's eval transform (from the checkpoint's pretrained_cfg) + pooled features."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    with open(os.path.join(args.source, "config.json")) as f:
        config = json.load(f)
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=config.get("num_classes", 1000),
        pretrained_cfg_overlay=config.get("pretrained_cfg", {}),
    ).eval()
    model.load_state_dict(load_file(os.path.join(args.source, "model.safetensors")))
    transform = create_transform(**resolve_data_config(model=model))
    paths = _image_paths(args.images)

    def forward():
        out = []
        for i in range(0, len(paths), args.batch_size):
            batch = [
                transform(Image.open(p).convert("RGB")) for p in paths[i : i + args.batch_size]
            ]
            with torch.inference_mode():
                feats = model.forward_head(
                    model.forward_features(torch.stack(batch)), pre_logits=True
                )
            out.append(torch.nn.functional.normalize(feats, dim=-1))
        return torch.cat(out)

    info = {
        "framework": f"timm {timm.__version__} transform + eager model",
        "backend_version": f"torch {torch.__version__}",
        "params": 0,
        "images": len(paths),
    }
    return forward, info


def _write_random_checkpoint(variant, folder):
    """A randomly initialised timm checkpoint in the Hub layout (config.json +
    model.safetensors), for the end-to-end mode when no --source is given."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(variant, pretrained=False).eval()
    os.makedirs(folder, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(folder, "model.safetensors"),
    )
    cfg = {
        k: v
        for k, v in dict(model.pretrained_cfg or {}).items()
        if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(
            {
                "architecture": variant,
                "num_classes": model.num_classes,
                "num_features": model.num_features,
                "pretrained_cfg": cfg,
            },
            f,
        )


# ----------------------------------------------------------------------------
# Cold start: whole processes
# ----------------------------------------------------------------------------


class _Phases:
    """Wall time of each phase since the last mark (and since the worker started)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.times = {}

    def __call__(self, name):
        now = time.perf_counter()
        self.times[name] = round(now - self.last, 4)
        self.last = now


def _timm_cold(args):
    """What timm needs to embed one image from a local checkpoint, phase by phase."""
    phases = _Phases()
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    phases("import")
    with open(os.path.join(args.source, "config.json")) as f:
        config = json.load(f)
    model = timm.create_model(
        config["architecture"],
        pretrained=False,
        num_classes=config.get("num_classes", 1000),
        pretrained_cfg_overlay=config.get("pretrained_cfg", {}),
    ).eval()
    phases("create model")
    model.load_state_dict(load_file(os.path.join(args.source, "model.safetensors")))
    phases("load weights")
    transform = create_transform(**resolve_data_config(model=model))
    x = transform(Image.open(args.image).convert("RGB"))[None]
    phases("read + transform")
    with torch.inference_mode():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        vector = torch.nn.functional.normalize(features, dim=-1).numpy()
    phases("first embedding")
    np.savez(args.cold_output, embeddings=vector)
    phases("save")
    return phases.times


def _keras_cold_phases(args):
    """`python -m embedding embed`'s work, phase by phase (same calls as the CLI)."""
    phases = _Phases()
    sys.path.insert(0, ROOT)
    import numpy as np

    phases("import numpy")
    import keras

    phases(f"import keras + {keras.backend.backend()}")
    from embedding.embedder import Embedder
    from embedding.model import enable_compilation_cache

    phases("import embedding")
    if args.cold_cache:
        enable_compilation_cache()
    embedder = Embedder(args.source, cache=args.cold_cache)
    phases("load model" + (" (cache)" if args.cold_cache else " (safetensors + port)"))
    vector = embedder.embed([args.image])
    phases("first embedding")
    np.savez(args.cold_output, embeddings=vector)
    phases("save")
    return phases.times


def _cold_commands(backends, source, image, output):
    """[(name, environment overrides, argv)] of every side, timm first."""
    me = [sys.executable, os.path.abspath(__file__)]
    timm_cmd = [*me, "--worker", "timm-cold", "--source", source, "--image", image]
    sides = [("timm", {}, [*timm_cmd, "--cold-output", output])]
    embed = [sys.executable, "-m", "embedding", "embed", image, "-o", output, "--model", source]
    for backend in backends:
        env = {"KERAS_BACKEND": backend}
        sides.append((f"keras-{backend} --no-cache", env, [*embed, "--no-cache"]))
        sides.append((f"keras-{backend} cached", env, embed))
    return sides


def _cold_image(folder):
    """A 500x375 JPEG photograph (scikit-image's chelsea when installed, else noise)."""
    import numpy as np
    from PIL import Image

    try:
        import skimage.data

        pixels = skimage.data.chelsea()
    except ImportError:
        pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    path = os.path.join(folder, "image.jpg")
    Image.fromarray(pixels).save(path, quality=90)
    return path


def bench_cold_start(variant, backends, args):
    """Whole-process cold starts, alternating sides run by run; returns the rows.
    Its checkpoint, image and caches live in a folder removed when it returns."""
    with tempfile.TemporaryDirectory(prefix="convnext-cold-") as work:
        return _bench_cold_start(variant, backends, args, work)


def _bench_cold_start(variant, backends, args, work):
    source = args.source or os.path.join(work, variant)
    if not args.source:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "checkpoint"]
        subprocess.run(
            cmd + ["--variant", variant, "--source", source],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=None if args.verbose else subprocess.DEVNULL,
        )
    image = _cold_image(work)
    output = os.path.join(work, "out.npz")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["KERAS_CONVNEXT_CACHE"] = os.path.join(work, "cache")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["CUDA_VISIBLE_DEVICES"], env["JAX_PLATFORMS"] = "", "cpu"
    sides = _cold_commands(backends, source, image, output)

    def run(side_env, argv):
        start = time.perf_counter()
        proc = subprocess.run(
            argv, env={**env, **side_env}, cwd=ROOT, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
        return seconds, proc.stdout

    for name, side_env, argv in sides:  # fill the caches (untimed)
        if name.endswith("cached"):
            run(side_env, argv)
    times = {name: [] for name, _, _ in sides}
    loads = {name: [] for name, _, _ in sides}
    for _ in range(args.rounds):
        for name, side_env, argv in sides:
            loads[name].append(_load())
            times[name].append(run(side_env, argv)[0])
            time.sleep(args.pause)
    rows = []
    for name, side_env, _argv in sides:
        # one more run per side, timing its phases from inside
        phase_argv = [sys.executable, os.path.abspath(__file__), "--source", source]
        phase_argv += ["--image", image, "--cold-output", output]
        if name == "timm":
            phase_argv += ["--worker", "timm-cold"]
        else:
            phase_argv += ["--worker", "keras-cold"] + (
                [] if "no-cache" in name else ["--cold-cache"]
            )
        _, stdout = run(side_env, phase_argv)
        phases = next(
            json.loads(line[len(PROTOCOL) :])
            for line in stdout.splitlines()
            if line.startswith(PROTOCOL)
        )["phases"]
        rows.append(
            {
                "name": name,
                "variant": variant,
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "runs": len(times[name]),
                "times_s": [round(t, 3) for t in times[name]],
                "load_1min": loads[name],
                "phases_s": phases,
            }
        )
    for row in rows:
        row["ratio_to_timm"] = row["median_s"] / rows[0]["median_s"]
    return rows


WORKERS = {
    "keras": _keras_forward,
    "timm": _timm_forward,
    "timm-compile": _timm_compiled_forward,
    "keras-e2e": _keras_e2e,
    "timm-e2e": _timm_e2e,
}
COLD_WORKERS = {"timm-cold": _timm_cold, "keras-cold": _keras_cold_phases}


def worker_main(args):
    if args.side == "checkpoint":
        _write_random_checkpoint(args.variant, args.source)
        return None
    if args.side in COLD_WORKERS:
        _send({"phases": COLD_WORKERS[args.side](args)})
        return None
    start = time.perf_counter()
    forward, info = WORKERS[args.side](args)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    forward()  # compiles / traces where the side does
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.warmup - 1):
        forward()
    warmup_s = time.perf_counter() - start
    _send(
        {
            "ready": True,
            "build_s": build_s,
            "first_call_s": first_call_s,
            "warmup_s": warmup_s,
            "malloc_thresholds_raised": _malloc_thresholds_raised(args.side),
            **info,
        }
    )
    for line in sys.stdin:
        command = line.split()
        if not command:
            continue
        if command[0] == "run":
            times, cpu_times = [], []
            for _ in range(int(command[1])):
                t0, c0 = time.perf_counter(), time.process_time()
                forward()
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            _send({"times": times, "cpu_times": cpu_times})
        elif command[0] == "quit":
            _send({"peak_rss_mb": _peak_rss_mb()})
            return


# ----------------------------------------------------------------------------
# Parent: spawn workers, alternate rounds, report
# ----------------------------------------------------------------------------


class Side:
    """One timed implementation: a worker kind, its backend, Keras call and extra
    environment (XLA_FLAGS), and the row name it gets."""

    def __init__(self, side, backend, call="predict_batch", env=None, name=None):
        self.side, self.backend, self.call = side, backend, call
        self.env = dict(env or {})
        self.name = name or ("timm" if side.startswith("timm") else f"keras-{backend}")

    def key(self):
        return self.name


TIMM_COMPILED = "timm +compile"


def allocator_sentence(report) -> str:
    """The sentences naming a run's allocator in its tables' captions (here and in the
    docs, `scripts/benchmark_tables.py`): the environment's settings, which every
    worker inherits (timm's too), and the sides whose process raised glibc's malloc
    thresholds itself (`THRESHOLDS_RAISED_BY`); empty for a run with neither."""
    settings = report["config"].get("allocator_env")
    raised = list(dict.fromkeys(
        row["name"] for row in report["results"] if row.get("malloc_thresholds_raised")
    ))  # fmt: skip
    sentence = ""
    if settings:
        named = ", ".join(f"`{k}={v}`" for k, v in settings.items())
        sentence += f" Every side's process, timm's too, ran with {named}."
    if raised:
        others = "; the other sides ran with glibc's defaults" if not settings else ""
        paths = "; ".join(THRESHOLDS_RAISED_BY.get(name, "its fast paths") for name in raised)
        sentence += (
            f" {', '.join(raised)} raised glibc's malloc thresholds in its own process at "
            f"its first call, as the library does by default on a CPU ({paths}){others}."
        )
    return sentence


# side -> the library's fast path that raises its process's malloc thresholds
THRESHOLDS_RAISED_BY = {
    "keras-torch": "`torch_keep_freed_memory`",
    "keras-jax": "`jax_heap_sized_batches`, for models with GRN",
}


def _malloc_thresholds_raised(side) -> bool:
    """Whether this worker's process raised glibc's malloc thresholds itself (the
    library's `fast_ops.keep_freed_memory`, at its first call)."""
    module = sys.modules.get("convnext_layers.fast_ops")
    return side.startswith("keras") and module is not None and module.kept_freed_memory()


def sides_for(backends, calls, xla_flags, timm_compile=False):
    """timm first (then timm + torch.compile with `timm_compile`), then every
    backend x call, then JAX with `xla_flags` (if any)."""
    sides = [Side("timm", "torch")]
    if timm_compile:
        sides.append(Side("timm-compile", "torch", name=TIMM_COMPILED))
    for backend in backends:
        for call in calls:
            name = f"keras-{backend}" + (f" {call}" if len(calls) > 1 else "")
            sides.append(Side("keras", backend, call, name=name))
    if xla_flags and "jax" in backends:
        sides.append(
            Side("keras", "jax", calls[0], {"XLA_FLAGS": xla_flags}, name="keras-jax +XLA_FLAGS")
        )
    return sides


class Worker:
    def __init__(self, side, backend, args, call=None, extra_env=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if side.startswith("keras"):
            env["KERAS_BACKEND"] = backend
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["JAX_PLATFORMS"] = "cpu"
        env.update(extra_env or {})
        self.side, self.backend = side, backend
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            side,
            "--variant",
            args.variant,
            "--batch-size",
            str(args.batch_size),
            "--resolution",
            str(args.resolution),
            "--dtype",
            args.dtype,
            "--device",
            args.device,
            "--warmup",
            str(args.warmup),
            "--call",
            call or args.call,
            "--backend",
            backend,
        ]
        if args.images:
            cmd += ["--images", args.images, "--source", args.source]
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if args.verbose else subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.info = self._receive()

    def _receive(self):
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        code = self.proc.wait()
        raise RuntimeError(
            f"{self.side} worker ({self.backend}) exited with code {code} before answering; "
            "rerun with --verbose to see its output."
        )

    def run(self, iterations):
        """Wall seconds of `iterations` passes (their CPU seconds in `self.cpu_times`)."""
        self.proc.stdin.write(f"run {iterations}\n")
        self.proc.stdin.flush()
        answer = self._receive()
        self.cpu_times = getattr(self, "cpu_times", []) + answer.get("cpu_times", [])
        return answer["times"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peak = self._receive()["peak_rss_mb"]
        self.proc.stdin.close()
        self.proc.wait()
        return peak


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _runnable():
    """Runnable threads on the machine right now (4th field of /proc/loadavg),
    the benchmark's own parent included; None where unavailable."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def _summarise(name, info, times, loads, peak_rss_mb, batch, flops):
    median = statistics.median(times)
    ips = batch / median
    return {
        "name": name,
        "framework": info["framework"],
        "backend_version": info["backend_version"],
        "params": info["params"],
        "batch_size": batch,
        "build_s": round(info["build_s"], 2),
        "first_call_s": round(info["first_call_s"], 2),
        "warmup_s": round(info["warmup_s"], 2),
        "malloc_thresholds_raised": info.get("malloc_thresholds_raised", False),
        "runs": len(times),
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "images_per_s": ips,
        "gflops_per_s": flops * ips / 1e9,
        "peak_rss_mb": round(peak_rss_mb, 1),
        "load_1min": loads,
        "times_s": [round(t, 4) for t in times],
    }


def passes_per_round(args, timm_times):
    """Timed passes per side in the next round: --iterations, raised so that a round
    of timm lasts about --min-round-seconds. A short pass (batch 1: ~15 ms) is timed
    over many more passes than a long one, so that the first pass of each round
    (slower: its thread pools woke up after the other side ran) does not set the
    median, while every side still gets the same number of passes."""
    if args.min_round_seconds <= 0 or not timm_times:
        return args.iterations
    wanted = math.ceil(args.min_round_seconds / statistics.median(timm_times))
    return max(args.iterations, min(wanted, MAX_PASSES_PER_ROUND))


def bench_variant(variant, batch, sides, args):
    """Alternate the sides (timm first) round by round at one batch size; the rows."""
    sub = argparse.Namespace(**{**vars(args), "variant": variant, "batch_size": batch})
    flops = 2 * macs(variant, args.resolution)
    workers = {}
    try:
        # Build one at a time (each builds and warms up alone on the machine).
        for side in sides:
            workers[side.key()] = Worker(side.side, side.backend, sub, side.call, side.env)
        times = {key: [] for key in workers}
        loads = {key: [] for key in workers}
        runnable = {key: [] for key in workers}
        passes = args.iterations
        for _ in range(args.rounds):
            for key, worker in workers.items():
                loads[key].append(_load())
                runnable[key].append(_runnable())
                times[key].extend(worker.run(passes))
                time.sleep(args.pause)
            passes = passes_per_round(args, times[sides[0].key()])
        peaks = {key: worker.close() for key, worker in workers.items()}
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
    rows = []
    for side in sides:
        key = side.key()
        row = _summarise(
            side.name, workers[key].info, times[key], loads[key], peaks[key], batch, flops
        )
        row["variant"] = variant
        row["call"] = None if side.side.startswith("timm") else side.call
        row["env"] = side.env
        row["runnable_threads"] = runnable[key]
        # the process's CPU seconds per pass (all its threads): a busy machine
        # stretches wall time, much less the CPU time a pass needs
        row["cpu_median_s"] = statistics.median(workers[key].cpu_times)
        rows.append(row)
    timm_row = rows[0]
    compiled = next((row for row in rows if row["name"] == TIMM_COMPILED), None)
    peak = cpu_peak_gflops().get(args.dtype) if args.device == "cpu" else None
    for row in rows:
        row["ratio_to_timm"] = row["images_per_s"] / timm_row["images_per_s"]
        row["rss_ratio_to_timm"] = row["peak_rss_mb"] / timm_row["peak_rss_mb"]
        row["cpu_ratio_to_timm"] = row["cpu_median_s"] / timm_row["cpu_median_s"]
        if compiled is not None:
            row["ratio_to_timm_compiled"] = row["images_per_s"] / compiled["images_per_s"]
        if peak:
            row["fraction_of_peak"] = row["gflops_per_s"] / peak
    return rows


def bench_end_to_end(variant, backends, args):
    """Embedder.embed over the folder vs timm transform + model, alternating."""
    if not _embedding_available():
        print("end-to-end mode skipped: the `embedding` package is not importable")
        return []
    if not os.path.isdir(args.images) or not _image_paths(args.images):
        raise SystemExit(f"--images {args.images!r}: no .jpg/.jpeg/.png files there")
    with tempfile.TemporaryDirectory(prefix="convnext-bench-") as work:
        return _bench_end_to_end(variant, backends, args, work)


def _bench_end_to_end(variant, backends, args, work):
    sub = argparse.Namespace(**{**vars(args), "variant": variant})
    if not sub.source:
        sub.source = os.path.join(work, variant)
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "checkpoint"]
        subprocess.run(
            cmd + ["--variant", variant, "--source", sub.source, "--images", args.images],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=None if args.verbose else subprocess.DEVNULL,
        )
    sides = [("timm-e2e", "torch")] + [("keras-e2e", b) for b in backends]
    workers, times = {}, {}
    try:
        for side, backend in sides:
            workers[(side, backend)] = Worker(side, backend, sub)
            times[(side, backend)] = []
        for _ in range(args.rounds):
            for key, worker in workers.items():
                times[key].extend(worker.run(1))
                time.sleep(args.pause)
        for worker in workers.values():
            worker.close()
    finally:
        for worker in workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
    rows = []
    for (side, backend), worker in workers.items():
        n = worker.info["images"]
        rows.append(
            {
                "name": "timm" if side == "timm-e2e" else f"keras-{backend} Embedder.embed",
                "variant": variant,
                "images": n,
                "median_s": statistics.median(times[(side, backend)]),
                "images_per_s": n / statistics.median(times[(side, backend)]),
            }
        )
    for row in rows:
        row["ratio_to_timm"] = row["images_per_s"] / rows[0]["images_per_s"]
    return rows


def _embedding_available():
    import importlib.util

    sys.path.insert(0, ROOT)
    try:
        return importlib.util.find_spec("embedding.embedder") is not None
    except ImportError:
        return False


def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = {
        "cpu": cpu,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "device": device,
    }
    try:
        with open("/proc/meminfo") as f:
            desc["memory_gb"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return desc


def _cpu_facts():
    """(usable CPUs, cores per socket x sockets, threads per core, MHz, flags) of this
    Linux CPU from /proc/cpuinfo (its flags as `convnext_common.cpu` reads them); Nones
    where it says nothing."""
    facts = {"mhz": None, "flags": set(cpu_flags() or ()), "siblings": None, "cores": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = (s.strip() for s in line.partition(":"))
                if key == "cpu MHz" and facts["mhz"] is None:
                    facts["mhz"] = float(value)
                elif key == "siblings" and facts["siblings"] is None:
                    facts["siblings"] = int(value)
                elif key == "cpu cores" and facts["cores"] is None:
                    facts["cores"] = int(value)
    except (OSError, ValueError):
        pass
    return facts


# FLOPs per cycle per core of one instruction family: 2 (multiply + add) x lanes x
# units. FMA units: 2 on the server cores with AVX-512 (Xeon Gold / Platinum, AMD
# Zen 4's two 256-bit halves give the same per-cycle count); /proc/cpuinfo does not
# say, so this is the assumption written into the results.
FMA_UNITS = 2
AMX_BF16_FLOPS_PER_CYCLE = 1024  # Intel AMX: a TDPBF16PS 16x32x16 tile product per 16 cycles


def cpu_peak_gflops():
    """{"float32": GFLOP/s, "bfloat16": GFLOP/s, "derivation": text} of this CPU, from
    its flags (the widest float32 FMA; bfloat16 dot products AVX512_BF16 or AMX-BF16),
    its usable cores and its nominal clock (/proc/cpuinfo "cpu MHz"; a core may run
    faster in turbo, so a measured rate can pass the nominal peak). {} where
    /proc/cpuinfo gives no clock."""
    facts = _cpu_facts()
    if not facts["mhz"]:
        return {}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads_per_core = (facts["siblings"] or 1) // (facts["cores"] or 1) or 1
    cores = max(1, usable // threads_per_core)
    flags = facts["flags"]
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    # a fused multiply-add is 2 FLOPs; without FMA, a multiply and an add unit
    fp32_per_cycle = (2 if "fma" in flags or "avx512f" in flags else 1) * lanes * FMA_UNITS
    fp32_name = "AVX-512 FMA" if lanes == 16 else "AVX2 FMA" if lanes == 8 else "SSE"
    if "amx_bf16" in flags:
        bf16_per_cycle, bf16_name = AMX_BF16_FLOPS_PER_CYCLE, "AMX-BF16 tiles"
    elif "avx512_bf16" in flags:
        bf16_per_cycle, bf16_name = 2 * fp32_per_cycle, "AVX512_BF16 dot products"
    else:
        bf16_per_cycle, bf16_name = fp32_per_cycle, "no bfloat16 instructions (as float32)"
    ghz = facts["mhz"] / 1000
    derivation = (
        f"{cores} core(s) ({usable} usable CPUs, {threads_per_core} thread(s) per core) "
        f"x {ghz:.2f} GHz nominal (/proc/cpuinfo) x FLOPs per cycle: float32 "
        f"{fp32_per_cycle:g} ({fp32_name}, {FMA_UNITS} FMA units assumed), bfloat16 "
        f"{bf16_per_cycle:g} ({bf16_name})"
    )
    return {
        "float32": cores * ghz * fp32_per_cycle,
        "bfloat16": cores * ghz * bf16_per_cycle,
        "derivation": derivation,
    }


def _pivot(rows, value, fmt):
    """A (variant, batch) x implementation table of `value(row)` as Markdown lines."""
    names = list(dict.fromkeys(row["name"] for row in rows))
    groups = list(dict.fromkeys((row["variant"], row["batch_size"]) for row in rows))
    lines = [
        "| variant | batch | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for variant, batch in groups:
        group = [r for r in rows if (r["variant"], r["batch_size"]) == (variant, batch)]
        by_name = {r["name"]: r for r in group}
        cells = [fmt(value(by_name[n])) if n in by_name else "" for n in names]
        lines.append(f"| {variant} | {batch} | " + " | ".join(cells) + " |")
    return lines


def _extra_sections(report):
    """The sections a run with timm + torch.compile, a known CPU peak and first-call
    times adds, after the full table (the tables before it keep their layout)."""
    results, lines = report["results"], []
    with_compiled = [r for r in results if "ratio_to_timm_compiled" in r]
    if with_compiled:
        lines += ["", "Speed relative to timm + torch.compile (images/s ratio, > 1 is faster):", ""]
        lines += _pivot(with_compiled, lambda r: r["ratio_to_timm_compiled"], "{:.2f}x".format)
    peak = report["machine"].get("peak_gflops") or {}
    dtype = report["config"]["dtype"]
    if peak.get(dtype) and all("fraction_of_peak" in r for r in results):
        lines += [
            "",
            f"GFLOP/s as a fraction of this CPU's {dtype} peak ({peak[dtype]:.0f} GFLOP/s: "
            f"{peak['derivation']}):",
            "",
        ]
        lines += _pivot(results, lambda r: r["fraction_of_peak"], "{:.1%}".format)
    if all("cpu_ratio_to_timm" in r for r in results):
        lines += [
            "",
            "CPU time per pass relative to timm eager (the process's CPU seconds, all its "
            "threads; < 1 is less; a loaded machine stretches wall time more than this):",
            "",
        ]
        lines += _pivot(results, lambda r: r["cpu_ratio_to_timm"], "{:.2f}x".format)
    if all("first_call_s" in r for r in results):
        lines += ["", "First call in seconds (compilation / tracing; not in the timed passes):", ""]
        lines += _pivot(results, lambda r: r["first_call_s"], "{:.1f}".format)
    return lines


def run_description(report) -> str:
    """The sentence above the tables: the run's sizes, machine, passes, calls, XLA_FLAGS
    row and the allocator settings every side ran with."""
    cfg = report["config"]
    m = report["machine"]
    batches = ", ".join(str(b) for b in cfg["batch_sizes"])
    return (
        f"ConvNeXt inference, batch {batches}, {cfg['resolution']}x"
        f"{cfg['resolution']}, {cfg['dtype']}, {cfg['device']}; {m['cpu']}, "
        f"{m['usable_cpus'] or m['logical_cpus']} usable CPUs, {m['os']}, Python {m['python']}. "
        f"{cfg['warmup']} warm-up passes, then {cfg['rounds']} alternating rounds of "
        f"{cfg['iterations']} timed passes per side"
        + (
            f" (more for short passes: each round after the first lasts about "
            f"{cfg['min_round_seconds']:g} s of timm)"
            if cfg.get("min_round_seconds")
            else ""
        )
        + "; median pass. Keras: "
        f"`{', '.join(cfg['calls'])}`; timm: eager `model(x)` under `torch.inference_mode()`"
        + (" (and `torch.compile(model)`: timm +compile)" if cfg.get("timm_compile") else "")
        + "."
        + (f" XLA_FLAGS row: `{cfg['xla_flags']}`." if cfg.get("xla_flags") else "")
        + allocator_sentence(report)
    )


def render_markdown(report):
    cfg = report["config"]
    m = report["machine"]
    lines = [run_description(report), ""]
    results = report["results"]
    if not results:  # another mode only (cold start, footprint)
        lines = [f"{m['cpu']}, {m['usable_cpus'] or m['logical_cpus']} usable CPUs, {m['os']}, "
                 f"Python {m['python']}."]  # fmt: skip
    else:
        lines += ["Speed relative to timm eager (images/s ratio, > 1 is faster):", ""]
        lines += _pivot(results, lambda r: r["ratio_to_timm"], "{:.2f}x".format)
        lines += ["", "Peak RSS relative to timm's worker (< 1 is less memory):", ""]
        lines += _pivot(results, lambda r: r["rss_ratio_to_timm"], "{:.2f}x".format)
        lines += [
            "",
            "| variant | batch | implementation | img/s | vs timm | GFLOP/s | median ms "
            "| min-max ms | peak RSS MB | load (1 min) |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for row in results:
        loads = [v for v in row["load_1min"] if v is not None]
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
        lines.append(
            f"| {row['variant']} | {row['batch_size']} | {row['name']} "
            f"({row['backend_version']}) "
            f"| {row['images_per_s']:.1f} | {row['ratio_to_timm']:.2f}x "
            f"| {row['gflops_per_s']:.1f} | {row['median_s'] * 1e3:.1f} "
            f"| {row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f} | {row['peak_rss_mb']:.0f} "
            f"| {load} |"
        )
    if results:
        lines += _extra_sections(report)
    if report.get("cold_start"):
        lines += [
            "",
            "Cold start: one process embeds one image (import, load, first embedding, save); "
            "median wall time of alternating runs:",
            "",
            "| implementation | median s | min-max s | vs timm | load (1 min) | where the time "
            "goes (one more run, s) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for row in report["cold_start"]:
            loads = [v for v in row["load_1min"] if v is not None]
            load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"
            phases = ", ".join(f"{k} {v:.2f}" for k, v in row["phases_s"].items())
            lines.append(
                f"| {row['name']} | {row['median_s']:.2f} | {row['min_s']:.2f}-"
                f"{row['max_s']:.2f} | {row['ratio_to_timm']:.2f}x | {load} | {phases} |"
            )
    if report.get("end_to_end"):
        lines += ["", "End-to-end (decode + preprocess + model), JPEG folder:", ""]
        lines += ["| implementation | images | img/s | vs timm |", "|---|---:|---:|---:|"]
        for row in report["end_to_end"]:
            lines.append(
                f"| {row['name']} | {row['images']} | {row['images_per_s']:.1f} "
                f"| {row['ratio_to_timm']:.2f}x |"
            )
    lines.append("")
    lines.append(
        "Load: 1-minute load average before each run."
        if not report["results"]
        else "FLOPs: analytic count of the convolutions and matmuls (2 x MACs; "
        + ", ".join(f"{v}: {macs(v, cfg['resolution']) / 1e9:.2f} GMACs" for v in cfg["variants"])
        + "). Load: 1-minute load average before each round."
    )
    return "\n".join(lines) + "\n"


def _int_list(text):
    values = [int(v) for v in str(text).split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, e.g. 1,8,32; got {text!r}")
    return values


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="convnext_atto", help="comma-separated timm names")
    p.add_argument("--backend", default="all", help="jax, tensorflow, torch, all or a list")
    p.add_argument(
        "--batch-size", type=_int_list, default=[32], help="a batch size or a list, e.g. 1,8,32"
    )
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes per worker")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--iterations", type=int, default=3, help="timed passes per round and side")
    p.add_argument(
        "--min-round-seconds",
        type=float,
        default=1.0,
        help="after the first round, raise the passes per round until timm's round lasts "
        "about this long (short passes such as batch 1 get more of them; 0: off)",
    )
    p.add_argument("--pause", type=float, default=0.5, help="seconds between rounds")
    p.add_argument(
        "--call",
        default="predict_batch",
        help="Keras inference path(s), comma-separated: predict_batch (ConvNeXt.predict_batch), "
        "predict_on_batch (keras' model.predict_on_batch) or call (model(x, training=False))",
    )
    p.add_argument(
        "--xla-flags",
        default=None,
        help="also time JAX with XLA_FLAGS set to this ('auto': docs/performance.md's flags)",
    )
    p.add_argument(
        "--timm-compile",
        action="store_true",
        help="also time timm through torch.compile (its compilation reported apart)",
    )
    p.add_argument("--quick", action="store_true", help="tiny batch and few passes (CI smoke)")
    p.add_argument("--output", default=None, help="output path without extension")
    p.add_argument("--images", default=None, help="end-to-end mode: a folder of JPEGs")
    p.add_argument("--source", default=None, help="end-to-end mode: checkpoint for Embedder")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--skip-model", action="store_true", help="only the end-to-end mode")
    p.add_argument(
        "--cold-start",
        action="store_true",
        help="cold-start mode: whole processes embedding one image (ours: the CLI) vs timm",
    )
    p.add_argument("--image", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cold-output", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cold-cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--worker", choices=(*WORKERS, *COLD_WORKERS, "checkpoint"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.worker:
        args.side = args.worker
        args.batch_size = args.batch_size[0]
        return worker_main(args)

    batch_sizes = args.batch_size
    if args.quick:
        batch_sizes = sorted({min(b, 2) for b in batch_sizes})
        args.resolution = min(args.resolution, 64)
        args.warmup, args.rounds, args.iterations, args.pause = 1, 1, 2, 0.0
        args.min_round_seconds = 0.0
    args.batch_size = max(batch_sizes)  # the end-to-end mode's batch
    calls = [c.strip() for c in args.call.split(",") if c.strip()]
    if not calls or any(c not in CALLS for c in calls):
        p.error(f"--call must be one or more of {', '.join(CALLS)}; got {args.call!r}")
    args.call = calls[0]
    xla_flags = XLA_FLAGS_MEASURED if args.xla_flags == "auto" else args.xla_flags
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    if args.backend == "all":
        backends = list(BACKENDS)
    else:
        backends = [b.strip() for b in args.backend.split(",")]
        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            p.error(f"unknown backend(s) {bad}; choose from {BACKENDS} or all")
    sides = sides_for(backends, calls, xla_flags, args.timm_compile)

    report = {
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            **machine_description(args.device),
            "peak_gflops": cpu_peak_gflops() if args.device == "cpu" else {},
        },
        "config": {
            "variants": variants,
            "backends": backends,
            "batch_sizes": batch_sizes,
            "resolution": args.resolution,
            "dtype": args.dtype,
            "device": args.device,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "iterations": args.iterations,
            "min_round_seconds": args.min_round_seconds,
            "calls": calls,
            "xla_flags": xla_flags or None,
            "allocator_env": allocator_env(),
            "timm_compile": args.timm_compile,
            "quick": args.quick,
            "flops": "analytic: 2 x MACs of convolutions and matmuls (benchmark.macs)",
        },
        "results": [],
    }
    if args.cold_start:
        args.skip_model = True
        report["config"]["rounds"] = args.rounds
        report["cold_start"] = bench_cold_start(variants[0], backends, args)
        for row in report["cold_start"]:
            print(
                f"cold start {row['name']:28s} {row['median_s']:6.2f} s "
                f"({row['ratio_to_timm']:4.2f}x timm)  load {row['load_1min']}  "
                f"{row['phases_s']}",
                flush=True,
            )
    for variant in [] if args.skip_model else variants:
        for batch in batch_sizes:
            rows = bench_variant(variant, batch, sides, args)
            for row in rows:
                print(
                    f"{variant:16s} b{batch:<4d} {row['name']:32s} {row['images_per_s']:8.2f} "
                    f"img/s {row['ratio_to_timm']:5.2f}x timm  {row['gflops_per_s']:7.1f} "
                    f"GFLOP/s  rss {row['peak_rss_mb']:6.0f} MB "
                    f"({row['rss_ratio_to_timm']:.2f}x)  load {row['load_1min']}",
                    flush=True,
                )
            report["results"].extend(rows)
    if args.images:
        report["end_to_end"] = bench_end_to_end(variants[0], backends, args)
        for row in report["end_to_end"]:
            print(
                f"end-to-end {row['name']:28s} {row['images_per_s']:8.2f} img/s "
                f"{row['ratio_to_timm']:5.2f}x timm ({row['images']} images)"
            )

    output = args.output
    if output is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        batch_tag = "-".join(str(b) for b in batch_sizes)
        name = f"{'+'.join(variants)}_b{batch_tag}_r{args.resolution}_{args.dtype}"
        output = os.path.join(HERE, "results", f"{name}_{args.device}_{stamp}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(output + ".md", "w") as f:
        f.write(render_markdown(report))
    print(f"wrote {output}.json and {output}.md")
    return report


if __name__ == "__main__":
    main()
