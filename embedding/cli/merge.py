"""`python -m embedding merge PART ... -o OUT`: join the parts of a sharded `embed` (.npz,
.parquet or folders of parts, into any of them: the output's name decides)."""

from __future__ import annotations

from convnext_common.cli import CommandError
from embedding.cli import options


def register(subparsers):
    p = subparsers.add_parser(
        "merge",
        help="join the parts of a sharded `embed` run into one output",
        description="Join the outputs of `embed --shard-index I --num-shards N` (.npz, "
        ".parquet or folders of parts; every file once, same files and model: a part from "
        "another model or job is refused) into one output equal to an unsharded run's.",
    )
    p.add_argument("parts", nargs="+", metavar="PART")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="OUT.npz, OUT.parquet, or a folder of Parquet parts (the name decides)",
    )
    p.set_defaults(handler=run)


def run(args):
    from embedding.jobs import JobError, merge_parts  # the jobs module loads Keras

    options.check_embeddings_output(args.output)
    try:
        result = merge_parts(args.parts, args.output)
    except JobError as error:
        raise CommandError(str(error)) from None
    print(
        f"wrote {args.output}: {result.count} embeddings from {len(args.parts)} parts"
        + (f", {result.skipped} skipped" if result.skipped else "")
    )
    return 0
