"""`python -m embedding serve --model SOURCE [--gallery STORE] ...`: the HTTP service
(`embedding.serve`: FastAPI + uvicorn, the `serve` extra).

What is cheap is checked before anything starts (the extra, the key file, the model
source, the gallery store, the address); then the server listens at once (`/healthz`),
prints `serving on http://HOST:PORT` and loads the model in the background (`/readyz`
turns 200 once it has run). A model that cannot be loaded stops the server with one
`error:` line. SIGTERM (or Ctrl-C) drains the requests in progress, then exits.
An `.onnx` model runs with onnxruntime and never loads Keras.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import signal
import socket

import weights_convert  # a light package face: each name loads its module when used
from convnext_common.cli import CommandError, non_negative_float, positive_int
from convnext_common.errors import error_message
from convnext_common.files import file_problem
from embedding.cli import options
from embedding.gallery import open_store
from embedding.images import DEFAULT_MAX_PIXELS
from embedding.onnx_embedder import OnnxEmbedder

SERVE_EXTRA = 'pip install "keras-convnext[serve]"'
GRACEFUL_SHUTDOWN_S = 30  # the longest SIGTERM waits for requests in progress


def _port(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0..65535 (0: any free port), got {text!r}")
    return value


def register(subparsers):
    p = subparsers.add_parser(
        "serve",
        help="HTTP service: embed, verify, enrol, identify (needs the serve extra)",
        description="Serve the model over HTTP (FastAPI + uvicorn): POST /v1/embed, "
        "/v1/verify, /v1/galleries/{name}/identities/{label}, /v1/galleries/{name}/identify; "
        "GET /healthz, /readyz, /metrics, /docs and the web page at /. Concurrent requests "
        "are batched into one model call.",
    )
    p.add_argument(
        "--gallery",
        default=None,
        metavar="STORE",
        help="gallery store: a folder (one file per gallery), sqlite:///PATH or "
        "postgresql://... (default: none, the gallery routes answer 404)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help="every /v1 route then needs 'Authorization: Bearer KEY' (KEY: the file's text)",
    )
    p.add_argument(
        "--max-batch", type=positive_int, default=32, metavar="N",
        help="most images per model call (1: no batching; default 32)",
    )  # fmt: skip
    p.add_argument(
        "--batch-timeout-ms", type=non_negative_float, default=5.0, metavar="MS",
        help="longest wait for a batch to fill (default 5)",
    )  # fmt: skip
    p.add_argument(
        "--max-queue", type=positive_int, default=256, metavar="N",
        help="images waiting for the model (and requests in progress) before 503 "
        "(default 256)",
    )  # fmt: skip
    p.add_argument(
        "--max-upload-mb", type=non_negative_float, default=20.0, metavar="MB",
        help="largest request body (default 20); larger ones get 413 before they are read",
    )  # fmt: skip
    p.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"),
        default="info",
    )  # fmt: skip
    options.add_face_options(p)
    options.add_model_options(p, run_options=False)
    p.set_defaults(handler=run)


def _read_api_key(path) -> str | None:
    if path is None:
        return None
    problem = file_problem(path)
    if problem is not None:
        raise CommandError(f"--api-key-file {path}: {problem}")
    try:
        with open(path, encoding="utf-8") as file:
            key = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"--api-key-file {path}: {error_message(error)}") from None
    if not key or any(c.isspace() for c in key) or not key.isprintable():
        raise CommandError(
            f"--api-key-file {path}: the key must be one line of printable characters "
            "without spaces (e.g. `openssl rand -hex 32 > FILE`)"
        )
    return key


def _check_model(args) -> str:
    source = options.check_model_source(args)
    if weights_convert.source_kind(source) == "onnx":
        if args.dtype != "float32":
            raise CommandError(
                f"--dtype {args.dtype}: an ONNX model computes in the dtype it was exported "
                "in; --dtype applies to checkpoints and .keras models"
            )
        sidecar = weights_convert.export_sidecar_path(source, "onnx")
        if not os.path.isfile(sidecar):
            raise CommandError(
                f"--model {source}: no sidecar {sidecar} beside it (export with "
                "`python -m embedding export`, which writes it)"
            )
    return source


def _model_loader(args, source: str):
    """() -> the embedder, made in the loading thread (Keras loads there, if at all)."""
    max_pixels = args.max_pixels

    def load():
        if weights_convert.source_kind(source) == "onnx":  # onnxruntime; never Keras
            return OnnxEmbedder(
                source, batch_size=args.max_batch, max_pixels=max_pixels or DEFAULT_MAX_PIXELS
            )
        return options.make_embedder(args, batch_size=args.max_batch, progress=False)

    return load


def _open_store(location):
    if location is None:
        return None
    try:
        return open_store(location)
    except (ValueError, OSError) as error:
        raise CommandError(f"--gallery {location}: {error_message(error)}") from None


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise CommandError(f"--host {host}: {error.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise CommandError(f"--host {host} --port {port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def run(args):
    try:  # the serve extra (FastAPI, uvicorn), optional
        import uvicorn

        from embedding.serve import ServeSettings, Service, create_app  # needs FastAPI
    except ImportError as error:
        raise CommandError(f"serve needs {error.name}: {SERVE_EXTRA}") from None
    api_key = _read_api_key(args.api_key_file)
    source = _check_model(args)
    face_options = options.face_options(args)
    detector = face_options.pop("detector")
    store = _open_store(args.gallery)
    sock = _bind(args.host, args.port)
    settings = ServeSettings(
        model_name=_display_name(source),
        max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        api_key=api_key,
        face_options=face_options,
    )
    # one detector per thread: OpenCV's keep state between calls
    factory = functools.partial(type(detector), detector.model_path) if detector else None
    service = Service(settings, _model_loader(args, source), store, factory)

    def stop(message):  # the model could not be loaded: the server has nothing to serve
        server.should_exit = True

    app = create_app(service, on_failure=stop)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        log_config=_log_config(uvicorn),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port} (model {source}; loading)", flush=True)
    # uvicorn drains on SIGTERM, then raises it again once its own handler is gone: this
    # one takes it then, so that a drained server exits 0 (and closes its store)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if store is not None:
            store.close()
    if service.failure is not None:
        raise CommandError(f"--model {source}: {service.failure}")
    return 0


def _log_config(uvicorn) -> dict:
    """uvicorn's logging, with the service's own logger ("embedding.serve") beside its."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["embedding.serve"] = {"handlers": ["default"], "level": "INFO"}
    return config


def _display_name(source: str) -> str:
    """How responses name the model: a Hub id as given, a local path by its last part."""
    path = os.fspath(source).rstrip("/" + os.sep)
    return os.path.basename(path) if os.path.exists(source) else source
