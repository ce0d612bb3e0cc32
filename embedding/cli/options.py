"""Options and helpers the subcommands share: the model options and the `Embedder` they
make, the face options, image files from the command line, skipped-file reports.

Nothing here imports Keras at module level: `python -m embedding --help` is instant and
`--backend` can still choose the backend. Keras loads in `make_embedder`, after that.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile

import weights_convert  # a light package face: each name loads its module when used
from convnext_common.cli import CommandError, positive_int
from convnext_common.errors import error_message
from convnext_common.files import check_output_path
from embedding.errors import InputError
from embedding.faces import DEFAULT_MARGIN, DEFAULT_MIN_SIZE, YuNetDetector
from embedding.files import IMAGE_EXTENSIONS, find_image_files
from embedding.formats import output_format
from embedding.images import DEFAULT_MAX_PIXELS
from embedding.parquet import arrow, part_name
from weights_convert.pretrained import DEFAULT_MODEL, license_notice


def add_model_options(
    parser: argparse.ArgumentParser,
    batch_size: int = 32,
    run_options: bool = True,
    dtype: bool = True,
) -> None:
    """--model, --batch-size, --dtype (the inference dtype), --pooling, --no-head-norm,
    --workers, --no-cache, --cache-dir, --max-pixels, --no-progress (`run_options=False`:
    without --batch-size, --workers and --no-progress, for a command that batches its own
    way; `dtype=False`: without --dtype, for a command that trains)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        metavar="SOURCE",
        help="Hub id, .safetensors file, folder with model.safetensors + config.json, or a "
        f".keras model written by weights_convert or finetune (default: {DEFAULT_MODEL})",
    )
    if run_options:
        group.add_argument("--batch-size", type=positive_int, default=batch_size, metavar="N")
    if dtype:
        group.add_argument(
            "--dtype",
            choices=("float32", "bfloat16"),  # convnext_layers.dtypes.DTYPES (which loads Keras)
            default="float32",
            help="bfloat16: the model computes in bfloat16 (norm statistics and the L2 in "
            "float32; faster on CPUs with AVX512-BF16 / AMX; on a CPU without bfloat16 "
            "instructions its bfloat16 weights compute in float32)",
        )
    group.add_argument("--pooling", choices=("avg", "max", "gem"), default="avg")
    group.add_argument(
        "--no-head-norm", action="store_true", help="skip timm's head LayerNorm after pooling"
    )
    if run_options:
        group.add_argument(
            "--workers", type=positive_int, default=None, help="image decoding threads"
        )
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
    if run_options:
        group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def model_source(args) -> str:
    return args.model or DEFAULT_MODEL


def check_model_source(args) -> str:
    """Refuse a `--model` that names no file and no Hub id, before anything is loaded."""
    source = model_source(args)
    problem = weights_convert.source_problem(source)
    if problem is not None:
        raise CommandError(f"--model {source}: {problem}")
    kind = weights_convert.source_kind(source)
    if kind != "checkpoint" and (args.pooling != "avg" or args.no_head_norm):
        raise CommandError(
            f"--model {source}: a .{kind} model has its own pooling and head; "
            "--pooling / --no-head-norm apply to checkpoints only"
        )
    return source


def make_embedder(args, **kwargs):
    """An `Embedder` from the options of `add_model_options` (any checkpoint source, or a
    `.keras` model this project wrote); `kwargs` are more or other `Embedder` arguments. A
    model that cannot be loaded is reported as an error naming `--model`, and a
    non-commercial licence gets a `note:` line."""
    source = check_model_source(args)
    # Keras loads here, after --backend chose the backend
    from embedding.embedder import Embedder
    from embedding.model import enable_compilation_cache

    if not args.no_cache:  # JAX: reuse compiled executables across runs
        enable_compilation_cache(args.cache_dir)
    settings = dict(
        pooling=args.pooling,
        head_norm=not args.no_head_norm,
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
    )
    if "dtype" in vars(args):  # add_model_options(dtype=True)
        settings.update(dtype=args.dtype)
    if "batch_size" in vars(args):  # add_model_options(run_options=True)
        settings.update(
            batch_size=args.batch_size, num_workers=args.workers, progress=not args.no_progress
        )
    settings.update(kwargs)
    try:
        embedder = Embedder(source, **settings)
    except CommandError:
        raise
    except (InputError, ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CommandError(f"--model {source}: {error_message(error)}") from error
    notice = license_notice(embedder.pretrained_cfg)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    return embedder


def image_files(paths, *, allow_none: bool = False):
    """The image files of the command line's paths (`embedding.files.find_image_files`: files
    as given, folders searched), or a `CommandError` naming a missing path or (unless
    `allow_none`) saying that nothing was found."""
    try:
        files = find_image_files(paths)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if not files and not allow_none:
        raise CommandError(
            "no image files found in " + ", ".join(map(str, paths)) + " (image names end in "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def find_images(paths) -> list[str]:
    """The paths of `image_files(paths, allow_none=True)`."""
    return [image.path for image in image_files(paths, allow_none=True)]


def check_embeddings_output(path, option: str = "-o") -> str:
    """The format of an embedding output (`embedding.formats.output_format`: the name
    decides), refused before any work when the name asks for no format, the path cannot
    be written, or Parquet is asked for without pyarrow installed."""
    kind = output_format(path, option=option)
    if kind == "folder":  # a file inside it must be writable (and the folder no file)
        check_output_path(os.path.join(path, part_name(0)), option=option)
    else:
        check_output_path(path, option=option)
    if kind != "npz":
        arrow()
    return kind


def print_skipped(skipped):
    """One "skipped: PATH: REASON" line on stderr per (path, reason)."""
    for name, reason in skipped:
        print(f"skipped: {name}: {reason}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Faces: enroll, identify
# ----------------------------------------------------------------------------


def add_face_options(parser: argparse.ArgumentParser) -> None:
    """--yunet, --no-align, --margin, --flip, --min-size."""
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


def face_options(args) -> dict:
    """Keyword arguments of embedding.faces.enroll / identify from `add_face_options`."""
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
