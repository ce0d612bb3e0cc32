"""Throughput of `embed --engine ray` (1 and 2 model actors) against the single-process
`embed`, on this machine, each run in its own process, alternating.

    python benchmarks/ray_throughput.py --images 512 --rounds 2 \\
        --output benchmarks/results/ray_throughput_cpu

Data: N JPEGs (scikit-image's photographs, random 240x320 crops) in 4 folders; model:
a random-weight convnext_atto at 224x224 (timm's layout, every parameter randomised;
`--model SOURCE` for another). Every configuration writes a folder of Parquet parts
(`--chunk-size` images each) and is timed two ways:

  steady img/s   images of the parts after the first / time from the first part
                 written to the last (no start-up: model load, actor start, first
                 compilation)
  job s          the whole job, from the call to the last part (model already built in
                 the driver; the Ray cluster already started)
  CPU ms/img     CPU time of the job's processes (the driver and every process under it:
                 Ray's GCS, raylet, tasks and actors, those already ended included) per
                 image, over the whole job: what it costs whatever else runs on the machine

single: `embedding.jobs.embed_files` (decoding threads + the model in one process);
ray-1: `embedding.raydata.embed_folder_job` with 1 actor (1 CPU) on a local cluster of
2 CPUs, decoding in tasks; ray-2: 2 actors of 0.5 CPU each. The load average is
recorded before and after every run: compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = ("single", "ray-1", "ray-2")

RUN = """
import json, os, sys, time
import psutil
config, model, images, out, chunk, batch = sys.argv[1:7]

def cpu_seconds():  # this process and every process under it (Ray's too), reaped ones included
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total

from embedding import Embedder
from embedding.raydata import find_images
embedder = Embedder(model, batch_size=int(batch), cache=False)
paths, labels = find_images([images])
embedder.embed(paths[: int(batch)])  # compile before the clock starts (single-process)
if config == "single":
    from embedding.jobs import embed_files
    start, cpu = time.time(), cpu_seconds()
    embed_files(embedder, paths, out, labels=labels, chunk_size=int(chunk), progress=False)
    cpu = cpu_seconds() - cpu
else:
    import ray
    from embedding.raydata import embed_folder_job
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    actors = int(config.split("-")[1])
    start, cpu = time.time(), cpu_seconds()
    embed_folder_job(embedder, paths, out, labels=labels, chunk_size=int(chunk),
                     actors=actors, num_cpus_per_actor=1.0 / actors, progress=False)
    cpu = cpu_seconds() - cpu
    ray.shutdown()
print("RESULT" + json.dumps({"start": start, "count": len(paths), "cpu": cpu}))
"""


def make_images(folder, count, seed=0):
    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = ("astronaut", "coffee", "chelsea", "rocket")
    for k in range(count):
        name = names[k % 4]
        image = getattr(skimage.data, name)()
        h, w = image.shape[:2]
        y, x = rng.integers(0, h - 240), rng.integers(0, w - 320)
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        Image.fromarray(image[y : y + 240, x : x + 320]).save(
            os.path.join(folder, name, f"{k:05d}.jpg"), quality=90
        )


def make_model(folder):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import timm  # noqa: F401  (before Keras: see tests/conftest.py)
    from conftest import random_timm_model, save_timm_checkpoint

    return str(save_timm_checkpoint(random_timm_model("convnext_atto", 0), folder, "convnext_atto"))


def run_once(config, model, images, work, chunk, batch) -> dict:
    out = os.path.join(work, f"{config}-{time.time_ns()}")
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled")  # fmt: skip
    load_before = os.getloadavg()
    proc = subprocess.run(
        [sys.executable, "-c", RUN, config, model, images, out, str(chunk), str(batch)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    info = json.loads(line[len("RESULT") :])
    times = sorted(
        os.path.getmtime(os.path.join(out, name))
        for name in os.listdir(out)
        if name.startswith("part-")
    )
    after_first = info["count"] - chunk  # images of the parts written after the first
    return {
        "config": config,
        "steady_img_s": after_first / (times[-1] - times[0]),
        "job_s": times[-1] - info["start"],
        "cpu_ms_per_img": 1000 * info["cpu"] / info["count"],
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: a random convnext_atto")
    parser.add_argument("--output", default=None, help="write OUTPUT.json and OUTPUT.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ray-throughput-") as work:
        images = os.path.join(work, "images")
        make_images(images, args.images)
        model = args.model or make_model(os.path.join(work, "model"))
        runs = []
        for round_ in range(args.rounds):
            order = CONFIGS if round_ % 2 == 0 else CONFIGS[::-1]  # alternate the order
            for config in order:
                result = run_once(config, model, images, work, args.chunk_size, args.batch_size)
                runs.append(result)
                print(json.dumps(result), flush=True)
    summary = {}
    for config in CONFIGS:
        mine = [r for r in runs if r["config"] == config]
        summary[config] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("steady_img_s", "job_s", "cpu_ms_per_img")
        }
    single = summary["single"]
    for config in CONFIGS:
        summary[config]["vs_single"] = summary[config]["steady_img_s"] / single["steady_img_s"]
        summary[config]["cpu_vs_single"] = (
            summary[config]["cpu_ms_per_img"] / single["cpu_ms_per_img"]
        )
    record = {
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
        "images": args.images,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "runs": runs,
        "summary": summary,
    }
    print(json.dumps(summary, indent=1))
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump(record, f, indent=1)
        lines = [
            f"# embed throughput, single process vs Ray ({record['date']}, {record['machine']},"
            f" KERAS_BACKEND={record['backend']}, {args.images} images 240x320, convnext_atto"
            " 224)",
            "",
            "| engine | steady img/s | vs single | CPU ms per image | vs single | job s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for config in CONFIGS:
            s = summary[config]
            lines.append(
                f"| {config} | {s['steady_img_s']:.1f} | {s['vs_single']:.2f}x | "
                f"{s['cpu_ms_per_img']:.0f} | {s['cpu_vs_single']:.2f}x | {s['job_s']:.1f} |"
            )
        lines += ["", "Medians of the runs below."]
        lines += ["", "Load average (1 min) before / after each run:", ""]
        lines += [
            f"- {r['config']}: {r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}, "
            f"{r['steady_img_s']:.1f} img/s, {r['cpu_ms_per_img']:.0f} CPU ms/img, "
            f"job {r['job_s']:.1f} s"
            for r in runs
        ]
        with open(args.output + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
