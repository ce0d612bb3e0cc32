"""`python -m embedding embed DIR_OR_FILE ... -o OUT`: resumable, shardable embedding of
image files into an .npz, a .parquet or a folder of Parquet parts (the name decides);
`--engine ray` runs it on a Ray cluster. The library side is `embedding.jobs` and
`embedding.raydata`."""

from __future__ import annotations

import sys

from convnext_common.cli import CommandError
from embedding.cli import options
from embedding.formats import skipped_files


def register(subparsers):
    p = subparsers.add_parser(
        "embed",
        help="embed images (files or folders) into an .npz or Parquet, resumably",
        description="Embed images into OUT: an .npz (arrays embeddings (N, D) float32, paths, "
        "labels, skipped paths and their reasons), a .parquet file, or a folder of Parquet "
        "parts (a name without a suffix or ending in /): one row per image with path, label, "
        "embedding (null for an unreadable image) and error, the model in the metadata. "
        "Labels: for an image found in a folder given here, the top-level sub-folder it "
        "lies in; for a file given by name, its folder's name. Every output loads as an "
        "embedding.Gallery. Finished chunks are kept (a folder's parts; a hidden .OUT.parts "
        "folder for a file): after an interruption, the same command continues from them; "
        "over a finished output it does nothing.",
    )
    p.add_argument("inputs", nargs="+", metavar="DIR_OR_FILE")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="OUT.npz, OUT.parquet, or a folder of Parquet parts (the name decides)",
    )
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
    options.add_model_options(p)
    p.set_defaults(handler=run)


def shard_arguments(args):
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


def run(args):
    shard_index, num_shards = shard_arguments(args)
    options.check_embeddings_output(args.output)
    files = options.image_files(args.inputs)
    embedder = options.make_embedder(args)
    from embedding.jobs import JobError, NothingReadableError, embed_files  # Keras: loaded now

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
        options.print_skipped(error.skipped)
        raise CommandError(str(error)) from None
    except JobError as error:
        raise CommandError(str(error)) from None
    report_skipped(args.output)
    shard = f" (shard {shard_index} of {num_shards})" if num_shards > 1 else ""
    print(
        f"wrote {args.output}{shard}: {result.count} embeddings of dim {embedder.dim}"
        + (f", {result.skipped} skipped" if result.skipped else "")
    )
    return 0


def report_skipped(output):
    """The skipped files recorded in an `embed` output, one stderr line each."""
    options.print_skipped(skipped_files(output))
