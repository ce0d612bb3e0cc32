"""`python -m embedding embed DIR_OR_FILE ... -o OUT`: resumable, shardable embedding of
image files into an .npz, a .parquet or a folder of Parquet parts (the name decides);
`--engine ray` runs it on a Ray cluster. The library side is `embedding.jobs` and
`embedding.raydata`."""

from __future__ import annotations

import sys

from convnext_common.cli import (
    CommandError,
    non_negative_float,
    positive_float,
    positive_int,
)
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
    engine = p.add_argument_group("engine")
    engine.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (default); ray: Ray Data, decoding in tasks and the model "
        "in an actor pool, on a local or existing Ray cluster (-o must be a folder of parts; "
        "inputs may be fsspec URLs such as s3://bucket/images/)",
    )
    engine.add_argument(
        "--address",
        default=None,
        help="--engine ray: the Ray cluster to join (host:port, auto, ray://...; default "
        "$RAY_ADDRESS, else a new local cluster)",
    )
    engine.add_argument(
        "--actors", type=positive_int, default=None, metavar="N", help="model actors (--engine "
        "ray; default: from 1 up to what the cluster's resources allow)",
    )  # fmt: skip
    engine.add_argument(
        "--cpus-per-actor", type=positive_float, default=1.0, metavar="C",
        help="logical CPUs each actor reserves (default 1; the model uses every core anyway)",
    )  # fmt: skip
    engine.add_argument(
        "--gpus-per-actor", type=non_negative_float, default=0.0, metavar="G",
        help="GPUs each actor reserves (default 0; 1 for a GPU per actor)",
    )  # fmt: skip
    options.add_model_options(p)
    p.set_defaults(handler=run)


ENGINES = ("local", "ray")


def check_engine(args, kind) -> None:
    """Refuse engine options that do not fit, before any work."""
    if args.engine != "ray":
        given = [o for o, v in (("--address", args.address), ("--actors", args.actors)) if v]
        if given:
            raise CommandError(f"{' and '.join(given)}: only with --engine ray")
        return
    if kind != "folder":
        raise CommandError(
            f"--engine ray writes a folder of Parquet parts: give -o a folder (a name without "
            f"a suffix, or ending in /), not {args.output}"
        )
    if args.num_shards is not None:
        raise CommandError("--engine ray schedules the whole job itself: leave out --shard-index")


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
    kind = options.check_embeddings_output(args.output)
    check_engine(args, kind)
    if args.engine == "ray":
        paths, labels = ray_inputs(args.inputs)
    else:
        files = options.image_files(args.inputs)
        paths, labels = [f.path for f in files], [f.label for f in files]
    embedder = options.make_embedder(args)
    from embedding.jobs import JobError, NothingReadableError, embed_files  # Keras: loaded now

    def log(message):
        print(message, file=sys.stderr)

    settings = dict(labels=labels, chunk_size=args.chunk_size, restart=args.restart,
                    progress=not args.no_progress, log=log)  # fmt: skip
    try:
        if args.engine == "ray":
            result = run_on_ray(args, embedder, paths, settings)
        else:
            result = embed_files(
                embedder,
                paths,
                args.output,
                shard_index=shard_index,
                num_shards=num_shards,
                distribution="auto" if args.distribute == "auto" else None,
                **settings,
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


def ray_inputs(inputs):
    """(paths, labels) of the inputs, local or fsspec URLs (`embedding.raydata`)."""
    from embedding.raydata import find_images  # no Keras: the job's listing

    try:
        paths, labels = find_images(inputs)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if not paths:
        raise CommandError(f"no image files found in {', '.join(map(str, inputs))}")
    return paths, labels


def run_on_ray(args, embedder, paths, settings):
    """The job on Ray: joins --address (or starts a local cluster), shuts down what it
    started."""
    from embedding.raydata import connect, embed_folder_job  # Ray: the ray extra

    with connect(args.address):
        return embed_folder_job(
            embedder,
            paths,
            args.output,
            actors=args.actors,
            num_cpus_per_actor=args.cpus_per_actor,
            num_gpus_per_actor=args.gpus_per_actor,
            **settings,
        )


def report_skipped(output):
    """The skipped files recorded in an `embed` output, one stderr line each."""
    options.print_skipped(skipped_files(output))
