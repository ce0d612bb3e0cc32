"""Command line: `python -m embedding COMMAND ...` (demo, embed, verify, evaluate, finetune,
enroll, identify, export, merge, ...).

Each subcommand is a function `add_parser(subparsers)` that adds its parser and
sets `handler=` to the function that runs it. `SUBCOMMANDS` lists them as
"module:function" strings; adding a subcommand is one line there. Handlers
import Keras lazily, so `--help` is instant and `--backend` can still pick the
Keras backend.

Errors: a handler raises; `main` is the one place that reports. Any
`embedding.errors.InputError` (bad images, pairs files, outputs, fine-tuning
data, ... and `CommandError` for what only the command line checks), an
`OSError` (a file that cannot be read or written) and the converter's
checkpoint errors (`EXPECTED_ERRORS`) become one `error: ...` line on stderr
and exit status 2; Ctrl-C exits with 130. Anything else is a bug and keeps its
traceback, and the global `--debug` shows the traceback of every error.
Handlers check what is cheap first (arguments, input files, whether the outputs
can be written) and only then load a model or start work.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

from embedding.errors import InputError, PairsFileError
from embedding.files import IMAGE_EXTENSIONS, check_output_path, file_problem, find_image_files

SUBCOMMANDS = [
    "embedding.cli:add_demo_parser",
    "embedding.cli:add_embed_parser",
    "embedding.cli:add_merge_parser",
    "embedding.cli:add_verify_parser",
    "embedding.cli:add_evaluate_parser",
    "embedding.finetune_cli:add_finetune_parser",
    "embedding.cli:add_enroll_parser",
    "embedding.cli:add_identify_parser",
    "embedding.cli:add_export_parser",
]
__all__ = ["IMAGE_EXTENSIONS", "CommandError", "find_images", "main"]


class CommandError(InputError):
    """A failure that only the command line checks: printed as `error: ...`, exit status 2."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types `main` reports as one `error:` line (see the module docstring)."""
    types = [InputError, OSError]
    converter = sys.modules.get("weights_convert")  # not imported: none of its errors happened
    if converter is not None:
        types += [
            converter.CheckpointError,
            converter.CheckpointMismatchError,
            converter.UnsupportedArchitectureError,
        ]
    return tuple(types)


def error_message(error: BaseException) -> str:
    """One line for `error: ...`: the message, or the OS error and its file."""
    if isinstance(error, OSError) and error.strerror:
        names = [n for n in (error.filename, error.filename2) if n is not None]
        text = error.strerror + (": " + " -> ".join(map(str, names)) if names else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the message held


# ----------------------------------------------------------------------------
# Argument types (argparse reports a bad value as `error: argument --x: ...`)
# ----------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


# ----------------------------------------------------------------------------
# Shared options
# ----------------------------------------------------------------------------


def add_model_options(
    parser: argparse.ArgumentParser, batch_size: int = 32, dtype: bool = True
) -> None:
    """--model, --batch-size, --dtype (the inference dtype; not with `dtype=False`),
    --pooling, --no-head-norm, --workers, --no-cache, --cache-dir, --max-pixels,
    --no-progress."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="SOURCE",
        help="Hub id, .safetensors file, folder with model.safetensors + config.json, or a "
        ".keras model written by weights_convert or finetune "
        "(default: timm/convnext_atto.d2_in1k)",
    )
    group.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N")
    if dtype:
        group.add_argument(
            "--dtype",
            choices=("float32", "bfloat16"),
            default="float32",
            help="bfloat16: the model computes in bfloat16 (norm statistics and the L2 in "
            "float32; faster on CPUs with AVX512-BF16 / AMX)",
        )
    group.add_argument("--pooling", choices=("avg", "max", "gem"), default="avg")
    group.add_argument(
        "--no-head-norm", action="store_true", help="skip timm's head LayerNorm after pooling"
    )
    group.add_argument("--workers", type=positive_int, default=None, help="image decoding threads")
    group.add_argument(
        "--no-cache", action="store_true", help="do not read or write the converted-model cache"
    )
    group.add_argument(
        "--cache-dir",
        default=None,
        help="converted-model cache (default $KERAS_CONVNEXT_CACHE or ~/.cache/keras-convnext)",
    )
    group.add_argument(
        "--max-pixels",
        type=positive_int,
        default=None,
        metavar="N",
        help="skip images with more pixels (decompression bombs; default PIL's limit, 89478485)",
    )
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def model_source(args) -> str:
    from embedding.model import DEFAULT_MODEL

    return args.model or DEFAULT_MODEL


def check_model_source(args) -> str:
    """Refuse a `--model` that names no file and no Hub id, before anything is loaded."""
    import weights_convert

    source = model_source(args)
    problem = weights_convert.source_problem(source)
    if problem is not None:
        raise CommandError(f"--model {source}: {problem}")
    if source.endswith(".keras") and (args.pooling != "avg" or args.no_head_norm):
        raise CommandError(
            f"--model {source}: a .keras model has its own pooling and head; "
            "--pooling / --no-head-norm apply to checkpoints only"
        )
    return source


def make_embedder(args, **kwargs):
    """An `Embedder` from the options of `add_model_options` (any checkpoint source, or a
    `.keras` model this project wrote); a model that cannot be loaded is reported as an
    error naming `--model`, and a non-commercial licence gets a `note:` line."""
    import zipfile

    from embedding.embedder import Embedder
    from embedding.model import enable_compilation_cache
    from embedding.preprocess import DEFAULT_MAX_PIXELS

    source = check_model_source(args)
    if not args.no_cache:  # JAX: reuse compiled executables across runs
        enable_compilation_cache(args.cache_dir)
    try:
        embedder = Embedder(
            source,
            pooling=args.pooling,
            head_norm=not args.no_head_norm,
            cache=not args.no_cache,
            cache_dir=args.cache_dir,
            batch_size=args.batch_size,
            dtype=args.dtype,
            num_workers=args.workers,
            max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
            progress=not args.no_progress,
            **kwargs,
        )
    except CommandError:
        raise
    except (InputError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CommandError(f"--model {source}: {error_message(error)}") from error
    from weights_convert.pretrained import license_notice

    notice = license_notice(embedder.pretrained_cfg)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    return embedder


def find_images(paths) -> list[str]:
    """Files as given, folders searched recursively for image files (sorted), by the
    one walker (`embedding.files`). Raises `CommandError` for a path that does not exist."""
    try:
        return [image.path for image in find_image_files(paths)]
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None


# ----------------------------------------------------------------------------
# embed
# ----------------------------------------------------------------------------


def add_embed_parser(subparsers):
    p = subparsers.add_parser(
        "embed",
        help="embed images (files or folders) into an .npz, resumably",
        description="Embed images into an .npz with arrays embeddings (N, D) float32, "
        "paths (N,), labels (N,) (for an image found in a folder given here, the top-level "
        "sub-folder it lies in; for a file given by name, its folder's name; the file loads "
        "as an embedding.Gallery), skipped (paths that could not be read) and their reasons. "
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


def run_embed(args):
    from embedding.jobs import JobError, NothingReadableError, embed_files

    shard_index, num_shards = _shard_arguments(args)
    check_output_path(args.output, option="-o")
    try:
        files = find_image_files(args.inputs)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if not files:
        raise CommandError(
            "no image files found in " + ", ".join(args.inputs) + " (image names end in "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    embedder = make_embedder(args)
    try:
        result = embed_files(
            embedder,
            [f.path for f in files],
            args.output,
            labels=[f.label for f in files],
            chunk_size=args.chunk_size,
            shard_index=shard_index,
            num_shards=num_shards,
            restart=args.restart,
            progress=not args.no_progress,
            distribution="auto" if args.distribute == "auto" else None,
            log=lambda message: print(message, file=sys.stderr),
        )
    except NothingReadableError as error:
        _print_skipped(error.skipped)
        raise CommandError(str(error)) from None
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
    """The skipped files recorded in an `embed` output, one stderr line each."""
    import numpy as np

    with np.load(output, allow_pickle=False) as data:
        _print_skipped(zip(data["skipped"].tolist(), data["skipped_reason"].tolist(), strict=True))


def _print_skipped(skipped):
    """One "skipped: PATH: REASON" line on stderr per (path, reason)."""
    for name, reason in skipped:
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

    check_output_path(args.output, option="-o")
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
        type=finite_float,
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
    from embedding.metrics import Calibration, CalibrationError

    for name, path in (("image1", args.image1), ("image2", args.image2)):
        problem = file_problem(path)
        if problem is not None:
            raise CommandError(f"{name} {path}: {problem}")
    calibration = None
    if args.calibration is not None:
        try:
            calibration = Calibration.load(args.calibration)
        except CalibrationError as error:
            raise CommandError(f"--calibration {args.calibration}: {error}") from None
    embedder = make_embedder(args, calibration=calibration)
    result = embedder.verify(args.image1, args.image2, threshold=args.threshold)
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


def _pairs_header(tokens) -> tuple[int | None, int] | None:
    """(folds or None, pairs per class per fold) of a header line, None if it is a pair line."""
    if not tokens or len(tokens) > 2 or not all(t.isdigit() for t in tokens):
        return None
    if len(tokens) == 1:
        return None, int(tokens[0])
    return int(tokens[0]), int(tokens[1])


def read_pairs(path, root, ext="jpg"):
    """Parse an LFW pairs file: ([(img1, img2)], labels, folds or None).

    Header "FOLDS PAIRS_PER_CLASS" (e.g. "10 300": 10 folds of 300 same + 300
    different pairs) or a single count of pairs per class; then "name n1 n2"
    (same person) and "name1 n1 name2 n2" (different) lines. Images are
    ROOT/name/name_%04d.EXT. Raises `PairsFileError` naming the file and line
    for anything else, and when the header's count disagrees with the lines.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split() for line in f]
    except UnicodeDecodeError:
        raise PairsFileError(f"{path}: not a text pairs file (not UTF-8)") from None
    except OSError as error:
        reason = error_message(error)
        raise PairsFileError(f"{path}: cannot read the pairs file ({reason})") from None
    numbered = [(no, tokens) for no, tokens in enumerate(lines, start=1) if tokens]
    if not numbered:
        raise PairsFileError(f"{path}: empty pairs file")
    folds = per_class = None
    header = _pairs_header(numbered[0][1])
    if header is not None:
        folds, per_class = header
        header_line, numbered = numbered[0][0], numbered[1:]

    def image(line_no, name, number):
        if name in (".", "..") or "/" in name or "\\" in name:
            raise PairsFileError(f"{path}:{line_no}: {name!r} is not a folder name under the root")
        if not number.isdigit():
            raise PairsFileError(
                f"{path}:{line_no}: {number!r} is not an image number (a whole number >= 1)"
            )
        return os.path.join(root, name, f"{name}_{int(number):04d}.{ext}")

    pairs, labels = [], []
    for line_no, tokens in numbered:
        if len(tokens) == 3:
            pairs.append((image(line_no, tokens[0], tokens[1]), image(line_no, *tokens[::2])))
            labels.append(1)
        elif len(tokens) == 4:
            pairs.append((image(line_no, *tokens[:2]), image(line_no, *tokens[2:])))
            labels.append(0)
        else:
            raise PairsFileError(
                f"{path}:{line_no}: expected 'name n1 n2' or 'name1 n1 name2 n2', "
                f"got {' '.join(tokens)!r}"
            )
    if folds is not None and folds < 2:
        raise PairsFileError(
            f"{path}:{header_line}: the header says {folds} fold(s); k-fold accuracy needs at "
            "least 2 (header 'FOLDS PAIRS_PER_CLASS', e.g. '10 300')"
        )
    if per_class is not None:
        expected = 2 * per_class * (folds or 1)
        if len(pairs) != expected:
            shape = f"{folds} folds x " if folds else ""
            raise PairsFileError(
                f"{path}: the header promises {shape}{per_class} same + {per_class} different "
                f"pairs = {expected} lines, found {len(pairs)} (truncated or wrong header?)"
            )
    return pairs, labels, folds


def missing_images(pairs) -> list[str]:
    """The distinct image paths of `pairs` that are not files, in order."""
    missing, seen = [], set()
    for pair in pairs:
        for path in pair:
            if path not in seen:
                seen.add(path)
                if file_problem(path) is not None:
                    missing.append(path)
    return missing


def add_evaluate_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="EER, ROC AUC, TAR@FAR and k-fold accuracy on an LFW-style pairs file",
    )
    p.add_argument("pairs", help="pairs file (header '10 300', then pair lines)")
    p.add_argument("--root", required=True, help="image folder: ROOT/name/name_0001.jpg")
    p.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    p.add_argument(
        "--folds",
        type=positive_int,
        default=None,
        help="k for k-fold accuracy, at least 2 (default: from header, 10)",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop the pairs whose images are missing instead of refusing the file",
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

    if not os.path.isdir(args.root):
        what = "a file, not a folder" if os.path.exists(args.root) else "no such folder"
        raise CommandError(f"--root {args.root}: {what}")
    if args.folds is not None and args.folds < 2:
        raise CommandError(f"--folds {args.folds}: k-fold accuracy needs at least 2 folds")
    if args.json:
        check_output_path(args.json, option="--json")
    if args.save_calibration:
        if args.target_far is None:
            raise CommandError("--save-calibration needs --target-far")
        check_output_path(args.save_calibration, option="--save-calibration")
    if args.target_far is not None and not 0.0 <= args.target_far <= 1.0:
        raise CommandError(f"--target-far must lie in [0, 1], got {args.target_far}")
    if args.bootstrap < 0 or not 0.0 < args.confidence < 1.0:
        raise CommandError("--bootstrap must be >= 0 and --confidence in (0, 1)")
    pairs, labels, header_folds = read_pairs(args.pairs, args.root, args.ext.lstrip("."))
    folds = args.folds or header_folds or 10
    missing = missing_images(pairs)
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        if not args.skip_missing:
            raise PairsFileError(
                f"{len(missing)} image(s) of {args.pairs} are missing under --root {args.root} "
                f"(--ext {args.ext}): {listed}; check --root and --ext, or pass --skip-missing"
            )
        gone = set(missing)
        keep = [k for k, pair in enumerate(pairs) if not gone.intersection(pair)]
        print(
            f"warning: {len(missing)} image(s) missing ({listed}); "
            f"{len(pairs) - len(keep)} of {len(pairs)} pairs dropped",
            file=sys.stderr,
        )
        pairs, labels = [pairs[k] for k in keep], [labels[k] for k in keep]
    _check_pair_labels(labels, folds, args.pairs)
    embedder = make_embedder(args)
    scores, valid, failures = embedder.pair_scores(pairs, on_error="skip")
    if failures:
        _print_skipped((failure.name, failure.reason) for failure in failures[:10])
        print(
            f"warning: {len(failures)} image(s) unreadable, {int((~valid).sum())} of "
            f"{len(pairs)} pairs dropped",
            file=sys.stderr,
        )
    labels = np.asarray(labels)[valid]
    _check_pair_labels(labels.tolist(), folds, args.pairs)
    from embedding.metrics import verification_metrics

    try:
        metrics = verification_metrics(scores[valid], labels, folds=folds)
    except ValueError as error:  # e.g. a fold whose other folds hold one kind of pair only
        raise PairsFileError(f"{args.pairs}: {error}") from error
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
        import weights_convert

        weights_convert.atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


def _check_pair_labels(labels, folds, path):
    """Refuse pairs that cannot give the metrics: both kinds needed, a pair per fold."""
    same = sum(1 for label in labels if label == 1)
    different = len(labels) - same
    if same == 0 or different == 0:
        raise PairsFileError(
            f"{path}: {same} same-person and {different} different-person pairs usable; "
            "the metrics need both"
        )
    if len(labels) < folds:
        raise PairsFileError(
            f"{path}: {len(labels)} usable pairs cannot fill {folds} folds; pass --folds "
            f"{max(2, min(len(labels), 10))} or fewer"
        )


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

    if args.model is not None and not args.offline:
        import weights_convert

        problem = weights_convert.source_problem(args.model)
        if problem is not None:
            raise CommandError(f"--model {args.model}: {problem}")
    try:
        return run_demo(model=args.model, offline=args.offline)
    except (ValueError, OSError) as error:
        if args.model is None:
            raise
        raise CommandError(f"--model {args.model}: {error_message(error)}") from error


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
    _print_skipped(result.skipped)
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
        type=finite_float,
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

    problem = file_problem(args.gallery)
    if problem is not None:
        what = "no such gallery file" if problem == "no such file" else problem
        raise CommandError(f"{args.gallery}: {what} (make one with `enroll`)")
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
    from weights_convert.cli import CommandLineParser  # one `error:` line, as every error

    parser = CommandLineParser(
        prog="python -m embedding",
        description="ConvNeXt image embeddings, verification and evaluation (Keras 3).",
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (for bug reports)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in SUBCOMMANDS:
        module, function = spec.split(":")
        getattr(importlib.import_module(module), function)(subparsers)
    return parser


def main(argv=None) -> int:
    try:  # usage errors: one "error:" line, then exit status 2
        args = build_parser().parse_args(None if argv is None else [os.fspath(a) for a in argv])
    except SystemExit as stop:  # returned, not raised, so `main` is callable as a function
        return stop.code if isinstance(stop.code, int) else 0
    if args.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
            print("error: --backend must be chosen before Keras is imported", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    import warnings

    from PIL import Image

    # images above the pixel limit are refused (and reported) by the preprocessing itself
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 130
    except expected_errors() as error:
        if args.debug:
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        if args.debug:
            raise
        print("error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: still one line; the traceback with --debug
        if args.debug:
            raise
        print(
            f"error: unexpected {type(error).__name__}: {error_message(error)} (a bug; rerun "
            "with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
