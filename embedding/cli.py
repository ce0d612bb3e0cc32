"""Command line: `python -m embedding {demo,embed,verify,evaluate,enroll,identify} ...`.

Each subcommand is a function `add_parser(subparsers)` that adds its parser and
sets `handler=` to the function that runs it. `SUBCOMMANDS` lists them as
"module:function" strings; adding a subcommand is one line there. Handlers
import Keras lazily, so `--help` is instant and `--backend` can still pick the
Keras backend.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = [
    "embedding.cli:add_demo_parser",
    "embedding.cli:add_embed_parser",
    "embedding.cli:add_verify_parser",
    "embedding.cli:add_evaluate_parser",
    "embedding.finetune:add_finetune_parser",
    "embedding.cli:add_enroll_parser",
    "embedding.cli:add_identify_parser",
    "embedding.cli:add_export_parser",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class CommandError(Exception):
    """A user-facing failure: printed as `error: ...`, exit status 2."""


# ----------------------------------------------------------------------------
# Shared options
# ----------------------------------------------------------------------------


def add_model_options(parser: argparse.ArgumentParser, batch_size: int = 32) -> None:
    """--model, --batch-size, --pooling, --no-head-norm, --workers, --no-cache, --cache-dir."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="SOURCE",
        help="Hub id, .safetensors file or folder with model.safetensors + config.json "
        "(default: timm/convnext_atto.d2_in1k)",
    )
    group.add_argument("--batch-size", type=int, default=batch_size, metavar="N")
    group.add_argument("--pooling", choices=("avg", "max", "gem"), default="avg")
    group.add_argument(
        "--no-head-norm", action="store_true", help="skip timm's head LayerNorm after pooling"
    )
    group.add_argument("--workers", type=int, default=None, help="image decoding threads")
    group.add_argument(
        "--no-cache", action="store_true", help="do not read or write the converted-model cache"
    )
    group.add_argument(
        "--cache-dir",
        default=None,
        help="converted-model cache (default $KERAS_CONVNEXT_CACHE or ~/.cache/keras-convnext)",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def make_embedder(args, **kwargs):
    """An `Embedder` from the options of `add_model_options`."""
    from embedding.embedder import Embedder
    from embedding.model import DEFAULT_MODEL, enable_compilation_cache

    if not args.no_cache:  # JAX: reuse compiled executables across runs
        enable_compilation_cache(args.cache_dir)
    return Embedder(
        args.model or DEFAULT_MODEL,
        pooling=args.pooling,
        head_norm=not args.no_head_norm,
        batch_size=args.batch_size,
        num_workers=args.workers,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
        **kwargs,
    )


def find_images(paths) -> list[str]:
    """Files as given, folders searched recursively for image files (sorted)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                found.extend(
                    os.path.join(folder, name)
                    for name in sorted(files)
                    if name.lower().endswith(IMAGE_EXTENSIONS)
                )
        elif os.path.exists(path):
            found.append(path)
        else:
            raise CommandError(f"{path}: no such file or folder")
    return found


# ----------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------


def add_embed_parser(subparsers):
    p = subparsers.add_parser(
        "embed",
        help="embed images (files or folders) into an .npz",
        description="Embed images into an .npz with arrays embeddings (N, D) float32, "
        "paths (N,), labels (N,) (each image's folder name; the file loads as an "
        "embedding.Gallery) and skipped (paths that could not be read).",
    )
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    add_model_options(p)
    p.set_defaults(handler=run_embed)


def run_embed(args):
    import numpy as np

    from embedding.gallery import _atomic_savez

    paths = find_images(args.inputs)
    if not paths:
        raise CommandError("no image files found in " + ", ".join(args.inputs))
    embedder = make_embedder(args)
    result = embedder.embed_many(paths, on_error="skip")
    for failure in result.failures:
        print(f"skipped: {failure}", file=sys.stderr)
    kept = [paths[i] for i in result.indices]
    labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in kept]
    _atomic_savez(
        args.output,
        embeddings=result.vectors.astype(np.float32),
        paths=np.asarray(kept, dtype=str),
        labels=np.asarray(labels, dtype=str),
        skipped=np.asarray([f.name for f in result.failures], dtype=str),
        model=np.asarray(str(embedder.source)),
    )
    print(
        f"wrote {args.output}: {len(kept)} embeddings of dim {embedder.dim}"
        + (f", {len(result.failures)} skipped" if result.failures else "")
    )
    return 0


# ----------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------


def add_verify_parser(subparsers):
    p = subparsers.add_parser(
        "verify", help="similarity of two images and a same/different verdict"
    )
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="accept when similarity >= T (default: 0.5, uncalibrated; "
        "`evaluate` prints calibrated thresholds)",
    )
    add_model_options(p)
    p.set_defaults(handler=run_verify)


def run_verify(args):
    embedder = make_embedder(args)
    result = embedder.verify(args.image1, args.image2, threshold=args.threshold)
    note = {
        "given": "",
        "calibrated": " (calibrated)",
        "default": " (uncalibrated default; calibrate with `evaluate` and pass --threshold)",
    }[result.threshold_source]
    print(f"similarity: {result.similarity:.6f}")
    print(f"threshold:  {result.threshold:.6f}{note}")
    print(f"verdict:    {'SAME' if result.verified else 'DIFFERENT'}")
    return 0


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------


def read_pairs(path, root, ext="jpg"):
    """Parse an LFW pairs file: ([(img1, img2)], labels, folds or None).

    Header "FOLDS PAIRS_PER_CLASS" (e.g. "10 300") or a single count; then
    "name n1 n2" (same person) and "name1 n1 name2 n2" (different) lines.
    Images are ROOT/name/name_%04d.EXT.
    """
    with open(path) as f:
        lines = [line.split() for line in f if line.strip()]
    if not lines:
        raise CommandError(f"{path}: empty pairs file")
    folds = None
    header = lines[0]
    if all(token.isdigit() for token in header) and len(header) in (1, 2):
        folds = int(header[0]) if len(header) == 2 else None
        lines = lines[1:]

    def image(name, number):
        return os.path.join(root, name, f"{name}_{int(number):04d}.{ext}")

    pairs, labels = [], []
    for line_no, tokens in enumerate(lines, start=2 if folds is not None else 1):
        try:
            if len(tokens) == 3:
                pairs.append((image(tokens[0], tokens[1]), image(tokens[0], tokens[2])))
                labels.append(1)
            elif len(tokens) == 4:
                pairs.append((image(tokens[0], tokens[1]), image(tokens[2], tokens[3])))
                labels.append(0)
            else:
                raise ValueError
        except ValueError:
            raise CommandError(
                f"{path}:{line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {' '.join(tokens)!r}"
            ) from None
    return pairs, labels, folds


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="EER, ROC AUC, TAR@FAR and k-fold accuracy on an LFW-style pairs file",
    )
    p.add_argument("pairs", help="pairs file (header '10 300', then pair lines)")
    p.add_argument("--root", required=True, help="image folder: ROOT/name/name_0001.jpg")
    p.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    p.add_argument(
        "--folds", type=int, default=None, help="k for k-fold accuracy (default: from header, 10)"
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    add_model_options(p)
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args):
    import json

    import numpy as np

    from embedding.metrics import verification_metrics

    pairs, labels, header_folds = read_pairs(args.pairs, args.root, args.ext)
    folds = args.folds or header_folds or 10
    embedder = make_embedder(args)
    scores, valid, failures = embedder.pair_scores(pairs, on_error="skip")
    if failures:
        for failure in failures[:10]:
            print(f"skipped: {failure}", file=sys.stderr)
        print(
            f"warning: {len(failures)} image(s) unreadable, {int((~valid).sum())} of "
            f"{len(pairs)} pairs dropped",
            file=sys.stderr,
        )
    labels = np.asarray(labels)[valid]
    metrics = verification_metrics(scores[valid], labels, folds=folds)
    print(f"model: {embedder.source}  (dim {embedder.dim})")
    print(metrics.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics.to_dict(), f, indent=2)
    return 0


# ----------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------


def add_demo_parser(subparsers):
    p = subparsers.add_parser(
        "demo",
        help="embed scikit-image's sample photos (pretrained if available, else random weights)",
    )
    p.add_argument("--model", default=None, metavar="SOURCE", help="checkpoint to try first")
    p.add_argument(
        "--offline", action="store_true", help="skip the Hub, go straight to the offline demo"
    )
    p.set_defaults(handler=_run_demo)


def _run_demo(args):
    from embedding.demo import run_demo

    return run_demo(model=args.model, offline=args.offline)


# ----------------------------------------------------------------------------
# faces: enroll, identify (the library side is embedding.faces)
# ----------------------------------------------------------------------------


def add_face_options(parser: argparse.ArgumentParser) -> None:
    """--yunet, --no-align, --margin, --flip, --min-size."""
    from embedding.faces import DEFAULT_MARGIN, DEFAULT_MIN_SIZE

    group = parser.add_argument_group("faces")
    group.add_argument(
        "--yunet",
        default=None,
        metavar="MODEL",
        help="detect with OpenCV's FaceDetectorYN and this YuNet .onnx file instead of the "
        "default Haar cascade (a weak baseline)",
    )
    group.add_argument(
        "--no-align", action="store_true", help="crop boxes with a margin, never warp landmarks"
    )
    group.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help="margin around unaligned boxes, a fraction of the box size per side "
        f"(default {DEFAULT_MARGIN})",
    )
    group.add_argument(
        "--flip", action="store_true", help="average each face with its mirror image"
    )
    group.add_argument(
        "--min-size",
        type=float,
        default=DEFAULT_MIN_SIZE,
        metavar="PX",
        help=f"ignore faces whose box is smaller than PX pixels (default {DEFAULT_MIN_SIZE})",
    )


def _face_options(args) -> dict:
    """Keyword arguments of embedding.faces.enroll / identify from `add_face_options`."""
    from embedding.faces import YuNetDetector

    if not args.margin >= 0:
        raise CommandError(f"--margin must be >= 0 (a fraction of the box size), got {args.margin}")
    if not args.min_size >= 0:
        raise CommandError(f"--min-size must be >= 0 pixels, got {args.min_size}")
    detector = YuNetDetector(args.yunet) if args.yunet else None
    return dict(
        detector=detector,
        align=not args.no_align,
        margin=args.margin,
        flip=args.flip,
        min_size=args.min_size,
    )


def _face_errors():
    from embedding.faces import FaceError, MissingExtraError

    return FaceError, MissingExtraError


def add_enroll_parser(subparsers):
    p = subparsers.add_parser(
        "enroll",
        help="build a face gallery from PEOPLE_DIR/<name>/<photos>",
        description="Enrol people into a gallery (.npz, loads as embedding.Gallery): one "
        "sub-folder per person, named by the label, with one or more photos. The largest face "
        "of each photo is embedded; photos without a face (or unreadable) are reported and "
        "skipped.",
    )
    p.add_argument("people_dir", metavar="PEOPLE_DIR")
    p.add_argument("-o", "--output", required=True, help="gallery file to write (.npz)")
    add_face_options(p)
    add_model_options(p)
    p.set_defaults(handler=run_enroll)


def run_enroll(args):
    from embedding.faces import enroll_folder, people_folders

    try:
        people_folders(args.people_dir)  # fail on an empty folder before loading the model
        options = _face_options(args)
        embedder = make_embedder(args)
        result = enroll_folder(embedder, args.people_dir, **options)
    except _face_errors() as error:
        raise CommandError(str(error)) from None
    for photo, reason in result.skipped:
        print(f"skipped: {photo}: {reason}", file=sys.stderr)
    counts = result.counts()
    for label, count in counts.items():
        print(f"enrolled {label}: {count} photo{'s' if count != 1 else ''}")
    result.gallery.save(args.output)
    print(
        f"wrote {args.output}: {len(result.gallery)} faces of {len(counts)} people "
        f"(dim {result.gallery.dim})"
        + (f", {len(result.skipped)} skipped" if result.skipped else "")
    )
    return 0


def add_identify_parser(subparsers):
    p = subparsers.add_parser(
        "identify",
        help="every face of an image with its best gallery match and a verdict",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--gallery", required=True, help="gallery written by `enroll`")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="a match needs similarity >= T (default: 0.5, uncalibrated; "
        "`evaluate` prints calibrated thresholds)",
    )
    p.add_argument(
        "--policy",
        choices=("all", "largest", "most_confident"),
        default="all",
        help="which faces to report (default all)",
    )
    add_face_options(p)
    add_model_options(p)
    p.set_defaults(handler=run_identify)


def run_identify(args):
    from embedding.faces import identify
    from embedding.gallery import Gallery
    from embedding.preprocess import load_image

    if not os.path.isfile(args.gallery):
        raise CommandError(f"{args.gallery}: no such gallery file (make one with `enroll`)")
    try:
        gallery = Gallery.load(args.gallery)
    except ValueError as error:
        raise CommandError(str(error)) from None
    image = load_image(args.image)  # an unreadable image fails before the model loads
    try:
        options = _face_options(args)
        embedder = make_embedder(args)
        found = identify(
            embedder,
            image,
            gallery,
            threshold=args.threshold,
            policy=args.policy,
            **options,
        )
    except _face_errors() as error:
        raise CommandError(str(error)) from None
    if not found:
        raise CommandError(f"{args.image}: no face found (min size {args.min_size:g} px)")
    for number, match in enumerate(found, start=1):
        box = ", ".join(f"{v:g}" for v in match.face.box)
        score = "-" if match.face.score is None else f"{match.face.score:.4g}"
        verdict = "MATCH" if match.matched else "UNKNOWN"
        print(
            f"face {number}: box [{box}] detector_score {score} "
            f"best {match.label} similarity {match.score:.6f} {verdict}"
        )
    note = "" if args.threshold is not None else " (uncalibrated default; pass --threshold)"
    print(f"threshold: {found[0].threshold:g}{note}")
    return 0


# ----------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------


def add_export_parser(subparsers):
    from weights_convert.cli import add_export_options

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
    p.set_defaults(handler=run_export)


def run_export(args):
    import time

    from weights_convert.cli import export_options, print_export

    try:
        options = export_options(args)  # before the model is loaded
    except ValueError as error:
        raise CommandError(str(error)) from None
    from embedding.model import DEFAULT_MODEL, build_model
    from weights_convert.export import ExportError, export_model

    start = time.perf_counter()
    model = build_model(
        args.model or DEFAULT_MODEL,
        pooling=args.pooling,
        head_norm=not args.no_head_norm,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )
    try:
        description = export_model(model, args.output, **options)
    except ExportError as error:
        raise CommandError(str(error)) from None
    print_export(description, args.output, time.perf_counter() - start)
    return 0


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m embedding",
        description="ConvNeXt image embeddings, verification and evaluation (Keras 3).",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in SUBCOMMANDS:
        module, function = spec.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
            print("error: --backend must be chosen before Keras is imported", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    from embedding.errors import USER_ERRORS

    try:
        return args.handler(args) or 0
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
