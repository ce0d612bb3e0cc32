"""`python -m embedding export -o OUT.onnx`: the embedding model (pooling, head norm, L2)
exported for deployment, with the converter's export options (`weights_convert.cli`)."""

from __future__ import annotations

import time

from weights_convert.cli import add_export_options, export_options, print_export
from weights_convert.pretrained import DEFAULT_MODEL


def register(subparsers):
    p = subparsers.add_parser(
        "export",
        help="export the embedding model to ONNX, LiteRT, SavedModel or OpenVINO",
        description="Export the embedding model (pooling, head norm, L2) for deployment, "
        "with a sidecar JSON (OUT.json, or OUT/keras_convnext.json for a SavedModel) "
        "holding its preprocessing, input, output dimension, architecture and licence.",
    )
    p.add_argument(
        "-o", "--output", required=True, help="OUT.onnx, OUT.tflite, OUT.xml or OUT/ (SavedModel)"
    )
    p.add_argument("--model", default=None, metavar="SOURCE", help="checkpoint (as for embed)")
    p.add_argument("--pooling", choices=("avg", "max", "gem"), default="avg")
    p.add_argument("--no-head-norm", action="store_true", help="skip timm's head LayerNorm")
    p.add_argument("--no-cache", action="store_true", help="bypass the converted-model cache")
    p.add_argument("--cache-dir", default=None, help="converted-model cache folder")
    add_export_options(p, input_size=True)
    p.set_defaults(handler=run)


def run(args):
    options = export_options(args)  # checked before the model is loaded
    # Keras loads here, after --backend chose the backend
    from embedding.model import build_model
    from weights_convert.export import export_model

    start = time.perf_counter()
    model = build_model(
        args.model or DEFAULT_MODEL,
        pooling=args.pooling,
        head_norm=not args.no_head_norm,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )
    description = export_model(model, args.output, **options)
    print_export(description, args.output, time.perf_counter() - start)
    return 0
