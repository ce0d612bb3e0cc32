"""The HTTP service against the library in-process, on the same checkpoint and images.

    python benchmarks/serve_benchmark.py --backend torch --clients 1,8,32 \\
        --output benchmarks/results/serve_cpu

For each Keras backend, in one run:
  in-process  `Embedder.embed` in its own worker process: batch 32 (32 JPEG files per call)
              and batch 1 (one file per call): images/s, p50 / p99 latency per call;
  served      `python -m embedding serve --max-batch 32 --batch-timeout-ms 5` (batching
              on) and `--max-batch 1` (batching off), each its own process: 1, 8 and 32
              concurrent clients (threads of this process, one keep-alive connection
              each, every request one JPEG to POST /v1/embed): images/s over the level,
              p50 / p99 latency per request.
Each side decodes the same JPEG bytes, preprocesses and runs the same model; the served
side adds HTTP, multipart parsing, the batcher and JSON. Measurements alternate, round
by round (in-process batch 32, served 32 clients, in-process batch 1, served 1 client,
then the rest), so a shared machine's load drifts hit every side alike; images/s are the
median over rounds, latencies pooled over rounds. The load average is recorded with
every measurement. Results: JSON and Markdown (--output).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("KERAS_BACKEND", "torch")  # this process only makes the checkpoint
PROTOCOL = "@@RESULT "
# scikit-image's bundled photographs (no download), 300-640 px: typical camera uploads
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel",
          "camera", "coins")  # fmt: skip


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# ----------------------------------------------------------------------------
# Inputs: a random checkpoint and JPEG files
# ----------------------------------------------------------------------------


def write_inputs(folder, variant) -> tuple[str, list[str]]:
    """(checkpoint folder: a timm `variant` with every parameter randomised, JPEG paths)."""
    import skimage.data
    import timm  # the convert extra: the checkpoint is made with timm itself
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from weights_convert import randomize_timm_parameters

    model = randomize_timm_parameters(timm.create_model(variant, pretrained=False), 0)
    checkpoint = os.path.join(folder, "checkpoint")
    os.makedirs(checkpoint)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(checkpoint, "model.safetensors"))  # fmt: skip
    cfg = {k: v for k, v in model.pretrained_cfg.items() if _jsonable(v)}
    with open(os.path.join(checkpoint, "config.json"), "w") as f:
        json.dump({"architecture": variant, "num_classes": model.num_classes,
                   "pretrained_cfg": cfg}, f)  # fmt: skip
    del model, torch
    paths = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        path = os.path.join(folder, f"{name}.jpg")
        image.save(path, quality=90)
        paths.append(path)
    return checkpoint, paths


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# ----------------------------------------------------------------------------
# The in-process side: a worker process answering commands on stdin
# ----------------------------------------------------------------------------


def worker(checkpoint, images) -> None:
    from embedding import Embedder

    embedder = Embedder(checkpoint, batch_size=32, cache=False)
    embedder.warm_up()
    embedder.embed(images)
    print(PROTOCOL + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        batch, calls = (int(v) for v in line.split())
        latencies = []
        start = time.perf_counter()
        for call in range(calls):
            chosen = [images[(call * batch + i) % len(images)] for i in range(batch)]
            begin = time.perf_counter()
            embedder.embed(chosen)
            latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - start
        print(PROTOCOL + json.dumps({"images_per_s": batch * calls / elapsed,
                                     "latencies": latencies}), flush=True)  # fmt: skip


class InProcess:
    def __init__(self, backend, checkpoint, images):
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", checkpoint, *images],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])
        raise RuntimeError(f"the in-process worker exited ({self.proc.wait()})")

    def measure(self, batch, calls) -> dict:
        load = load_average()
        self.proc.stdin.write(f"{batch} {calls}\n")
        self.proc.stdin.flush()
        return {**self._read(), "load": load}

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(60)


# ----------------------------------------------------------------------------
# The served side: a server process and client threads
# ----------------------------------------------------------------------------


class Server:
    def __init__(self, backend, checkpoint, max_batch, log_path):
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "embedding", "serve", "--model", checkpoint, "--port", "0",
             "--max-batch", str(max_batch), "--batch-timeout-ms", "5", "--no-cache",
             "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=self.log, env=env, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        if not line.startswith("serving on "):
            raise RuntimeError(f"the server did not start: {line!r} (see {log_path})")
        self.host, port = line.split()[2].rsplit("/", 1)[1].split(":")
        self.port = int(port)
        deadline = time.monotonic() + 900
        while self._get("/readyz") != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the server did not get ready (see {log_path})")
            time.sleep(0.5)

    def _get(self, path) -> int:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0

    def measure(self, bodies, clients, requests_per_client) -> dict:
        """`clients` threads each posting `requests_per_client` images, one per request."""
        latencies, failures = [], []
        start_line = threading.Barrier(clients + 1)

        def client(number):
            conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
            mine = []
            start_line.wait()
            for i in range(requests_per_client):
                body, content_type = bodies[(number + i * clients) % len(bodies)]
                begin = time.perf_counter()
                conn.request("POST", "/v1/embed", body, {"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                mine.append(time.perf_counter() - begin)
                if response.status != 200:
                    failures.append(response.status)
            conn.close()
            latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        load = load_average()
        start_line.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - start
        if failures:
            raise RuntimeError(f"{len(failures)} requests failed: {sorted(set(failures))}")
        return {"images_per_s": clients * requests_per_client / elapsed,
                "latencies": latencies, "load": load}  # fmt: skip

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def multipart_bodies(paths) -> list[tuple[bytes, str]]:
    """(body, content type) of a one-file `images` upload per path, encoded once."""
    bodies = []
    for path in paths:
        boundary = uuid.uuid4().hex
        with open(path, "rb") as f:
            data = f.read()
        name = os.path.basename(path)
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; '
            f'filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
        bodies.append((body, f"multipart/form-data; boundary={boundary}"))
    return bodies


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def summarise(samples: list[dict]) -> dict:
    latencies = [v for s in samples for v in s["latencies"]]
    return {
        "images_per_s": statistics.median(s["images_per_s"] for s in samples),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "samples": len(latencies),
        "load": [min(s["load"] for s in samples), max(s["load"] for s in samples)],
    }


def run_backend(backend, checkpoint, images, args, folder) -> dict:
    bodies = multipart_bodies(images)
    print(f"[{backend}] starting the in-process worker and two servers", file=sys.stderr)
    inproc = InProcess(backend, checkpoint, images)
    batched = Server(backend, checkpoint, 32, os.path.join(folder, f"{backend}-batched.log"))
    unbatched = Server(backend, checkpoint, 1, os.path.join(folder, f"{backend}-single.log"))
    samples: dict[str, list] = {}
    try:
        for server in (batched, unbatched):  # a first pass to warm the connections
            server.measure(bodies, 2, 2)
        for round_ in range(args.rounds):
            plan = [("in-process batch 32", lambda: inproc.measure(32, args.calls_32))]
            plan += [("in-process batch 1", lambda: inproc.measure(1, args.calls_1))]
            for clients in args.clients:
                per_client = max(2, args.requests // clients)
                for name, server in (("served", batched), ("served, batching off", unbatched)):
                    run = lambda s=server, c=clients, n=per_client: s.measure(bodies, c, n)
                    plan.append((f"{name}, {clients} clients", run))
            order = sorted(plan, key=lambda item: "32" not in item[0])  # the 32s first, together
            for name, measure in order:
                samples.setdefault(name, []).append(measure())
                speed = samples[name][-1]["images_per_s"]
                print(f"[{backend}] round {round_ + 1}: {name}: {speed:.1f} img/s", file=sys.stderr)
    finally:
        inproc.close()
        batched.close()
        unbatched.close()
    rows = {name: summarise(values) for name, values in samples.items()}
    base32 = rows["in-process batch 32"]["images_per_s"]
    base1 = rows["in-process batch 1"]
    for row in rows.values():
        row["vs_in_process_b32"] = row["images_per_s"] / base32
        row["p99_vs_in_process_b1_p99"] = row["p99_ms"] / base1["p99_ms"]
        row["p99_vs_in_process_b1_p50"] = row["p99_ms"] / base1["p50_ms"]
    return rows


def markdown(report: dict) -> str:
    lines = [
        f"# Serving benchmark: {report['variant']} at {report['resolution']}x"
        f"{report['resolution']}, one JPEG per request",
        "",
        f"{report['date'][:10]}, {report['machine']}; {report['rounds']} alternating rounds; "
        "load = 1-minute load average during the measurements (min-max).",
        "",
        "| backend | side | images/s | vs in-process batch 32 | p50 ms | p99 ms | "
        "p99 / in-process batch-1 p99 | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, rows in report["backends"].items():
        for name, row in rows.items():
            lines.append(
                f"| {backend} | {name} | {row['images_per_s']:.1f} | "
                f"{row['vs_in_process_b32']:.2f}x | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['p99_vs_in_process_b1_p99']:.2f}x | "
                f"{row['load'][0]:.1f}-{row['load'][1]:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", help="jax, tensorflow, torch or a list")
    parser.add_argument("--variant", default="convnext_atto")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=128, help="per level and round")
    parser.add_argument("--calls-32", type=int, default=4, help="batch-32 calls per round")
    parser.add_argument("--calls-1", type=int, default=64, help="batch-1 calls per round")
    parser.add_argument("--output", default=None, help="path without extension")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return 0
    args.clients = [int(v) for v in args.clients.split(",")]
    backends = ("jax", "tensorflow", "torch") if args.backend == "all" else args.backend.split(",")
    folder = tempfile.mkdtemp(prefix="serve-benchmark-")
    try:
        checkpoint, images = write_inputs(folder, args.variant)
        report = {
            "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
            f"Python {platform.python_version()}",
            "variant": args.variant,
            "resolution": 224,
            "rounds": args.rounds,
            "clients": args.clients,
            "load_start": load_average(),
            "backends": {b: run_backend(b, checkpoint, images, args, folder) for b in backends},
            "load_end": load_average(),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = markdown(report)
    print(text)
    if args.output:
        with open(args.output + ".json", "w") as f:
            json.dump(report, f, indent=2)
        with open(args.output + ".md", "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
