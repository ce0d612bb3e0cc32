"""Command line: `python -m embedding {demo,embed,merge,verify,evaluate,finetune} ...`.

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
    "embedding.cli:add_merge_parser",
    "embedding.cli:add_verify_parser",
    "embedding.cli:add_evaluate_parser",
    "embedding.finetune:add_finetune_parser",
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
    from embedding.model import DEFAULT_MODEL

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
        help="embed images (files or folders) into an .npz, resumably",
        description="Embed images into an .npz with arrays embeddings (N, D) float32, "
        "paths (N,), labels (N,) (each image's folder name; the file loads as an "
        "embedding.Gallery), skipped (paths that could not be read) and their reasons. "
        "Finished chunks of files are kept in a hidden .OUT.parts folder next to the "
        "output: after an interruption, the same command continues from them.",
    )
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    group = p.add_argument_group("jobs")
    group.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        metavar="N",
        help="files per chunk written as it goes (the unit of resumption; default 1024)",
    )
    group.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="embed only shard I of --num-shards (0-based); join the parts with `merge`",
    )
    group.add_argument("--num-shards", type=int, default=None, metavar="N")
    group.add_argument(
        "--restart", action="store_true", help="discard chunks of an earlier run of this output"
    )
    group.add_argument(
        "--distribute",
        choices=("auto", "none"),
        default="auto",
        help="auto: on JAX with several devices, split every batch over them (DataParallel)",
    )
    add_model_options(p)
    p.set_defaults(handler=run_embed)


def _shard_arguments(args):
    if (args.shard_index is None) != (args.num_shards is None):
        raise CommandError("--shard-index and --num-shards go together")
    index, count = args.shard_index or 0, args.num_shards or 1
    if count < 1 or not 0 <= index < count:
        raise CommandError(
            f"--shard-index must be in 0..{count - 1} and --num-shards >= 1 "
            f"(got {index} of {count})"
        )
    if args.chunk_size < 1:
        raise CommandError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    return index, count


def _check_output(path):
    """Refuse an output that cannot be written before any work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandError(f"-o {path} is a folder; give a file name such as {path}/vectors.npz")
    if not os.path.isdir(folder):
        raise CommandError(f"-o {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CommandError(f"-o {path}: the folder {folder} is not writable")


def run_embed(args):
    from embedding.jobs import JobError, embed_files

    shard_index, num_shards = _shard_arguments(args)
    _check_output(args.output)
    paths = find_images(args.inputs)
    if not paths:
        raise CommandError("no image files found in " + ", ".join(args.inputs))
    embedder = make_embedder(args)
    try:
        result = embed_files(
            embedder,
            paths,
            args.output,
            chunk_size=args.chunk_size,
            shard_index=shard_index,
            num_shards=num_shards,
            restart=args.restart,
            progress=not args.no_progress,
            distribution="auto" if args.distribute == "auto" else None,
            log=lambda message: print(message, file=sys.stderr),
        )
    except JobError as error:
        raise CommandError(str(error)) from None
    _report_skipped(args.output)
    shard = f" (shard {shard_index} of {num_shards})" if num_shards > 1 else ""
    print(
        f"wrote {args.output}{shard}: {result.count} embeddings of dim {embedder.dim}"
        + (f", {result.skipped} skipped" if result.skipped else "")
    )
    return 0


def _report_skipped(output):
    import numpy as np

    with np.load(output, allow_pickle=False) as data:
        for name, reason in zip(
            data["skipped"].tolist(), data["skipped_reason"].tolist(), strict=True
        ):
            print(f"skipped: {name}: {reason}", file=sys.stderr)


# ----------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------


def add_merge_parser(subparsers):
    p = subparsers.add_parser(
        "merge",
        help="join the parts of a sharded `embed` run into one .npz",
        description="Join the outputs of `embed --shard-index I --num-shards N` (every "
        "shard once, same files and model) into one .npz equal to an unsharded run's.",
    )
    p.add_argument("parts", nargs="+", metavar="PART")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    p.set_defaults(handler=run_merge)


def run_merge(args):
    from embedding.jobs import JobError, merge_parts

    _check_output(args.output)
    try:
        result = merge_parts(args.parts, args.output)
    except JobError as error:
        raise CommandError(str(error)) from None
    print(
        f"wrote {args.output}: {result.count} embeddings from {len(args.parts)} parts"
        + (f", {result.skipped} skipped" if result.skipped else "")
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
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="accept when similarity >= T (default: 0.5, uncalibrated; "
        "`evaluate` prints calibrated thresholds)",
    )
    choice.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="take the threshold from a calibration JSON (`evaluate --target-far F "
        "--save-calibration FILE`) or from a gallery .npz saved with one",
    )
    add_model_options(p)
    p.set_defaults(handler=run_verify)


def run_verify(args):
    import math

    from embedding.metrics import Calibration, CalibrationError

    if args.threshold is not None and not math.isfinite(args.threshold):
        raise CommandError(f"--threshold must be a finite number, got {args.threshold}")
    calibration = None
    if args.calibration is not None:
        try:
            calibration = Calibration.load(args.calibration)
        except CalibrationError as error:
            raise CommandError(str(error)) from None
    embedder = make_embedder(args, calibration=calibration)
    try:
        result = embedder.verify(args.image1, args.image2, threshold=args.threshold)
    except ValueError as error:  # NaN/Inf embeddings: no verdict
        raise CommandError(str(error)) from None
    note = {
        "given": "",
        "calibrated": " (calibrated)",
        "default": " (uncalibrated default; calibrate with `evaluate` and pass --threshold)",
    }[result.threshold_source]
    if result.calibration is not None:
        c = result.calibration
        note = (
            f" (calibrated at FAR <= {c.target_far:g}: FAR {c.far:.2g}, FRR {c.frr:.4f} on "
            f"{c.n_genuine} genuine / {c.n_impostor} impostor pairs; {args.calibration})"
        )
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
    group = p.add_argument_group("operating point")
    group.add_argument(
        "--target-far",
        type=float,
        default=None,
        metavar="F",
        help="also choose the threshold whose false-accept rate is at most F (e.g. 1e-3), "
        "with bootstrap confidence intervals",
    )
    group.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="resamples (default 1000)"
    )
    group.add_argument("--confidence", type=float, default=0.95, help="interval level")
    group.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    group.add_argument(
        "--save-calibration",
        default=None,
        metavar="FILE",
        help="write the operating point as JSON, for `verify --calibration FILE`",
    )
    add_model_options(p)
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args):
    import json

    import numpy as np

    from embedding.metrics import verification_metrics

    if args.save_calibration and args.target_far is None:
        raise CommandError("--save-calibration needs --target-far")
    if args.target_far is not None and not 0.0 <= args.target_far <= 1.0:
        raise CommandError(f"--target-far must lie in [0, 1], got {args.target_far}")
    if args.bootstrap < 0 or not 0.0 < args.confidence < 1.0:
        raise CommandError("--bootstrap must be >= 0 and --confidence in (0, 1)")
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
    record = metrics.to_dict()
    if args.target_far is not None:
        from embedding.metrics import calibrate

        try:
            calibration = calibrate(
                scores[valid],
                labels,
                args.target_far,
                n_bootstrap=args.bootstrap,
                confidence=args.confidence,
                seed=args.seed,
                model=str(embedder.source),
            )
        except ValueError as error:
            raise CommandError(str(error)) from None
        print(calibration.summary())
        record["calibration"] = calibration.to_dict()
        if args.save_calibration:
            try:
                calibration.save(args.save_calibration)
            except OSError as error:
                raise CommandError(f"cannot write {args.save_calibration}: {error}") from None
            print(f"wrote {args.save_calibration}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
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
