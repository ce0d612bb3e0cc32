"""The HTTP service (`python -m embedding serve`): FastAPI + uvicorn, the `serve` extra.

    from embedding.serve import ServeSettings, Service, create_app
    service = Service(ServeSettings(max_batch=32), load_embedder=lambda: Embedder(...))
    app = create_app(service)            # uvicorn.run(app) or any ASGI server

FastAPI's "bigger applications" layout: `app` assembles everything; `routers/` holds one
router per domain (`health`, `embed`, `verify`, `galleries`); `dependencies` what routes
ask for; `auth`, `limits` and `metrics` the ASGI middleware (they act before a body is
read); `errors` the one JSON error shape; `schemas` the response bodies; `service` the
model, batcher, detector and gallery store the routes call; `static/` the web page (plain
HTML + JavaScript, nothing fetched from other hosts). What is not HTTP lives in the
library: `embedding.batching` (the dynamic batcher), `embedding.onnx_embedder` (exported
models without Keras), `embedding.faces`, `embedding.gallery` (the stores).
"""

from embedding.serve.app import create_app
from embedding.serve.service import Service, Upload
from embedding.serve.settings import ServeSettings

__all__ = ["ServeSettings", "Service", "Upload", "create_app"]
