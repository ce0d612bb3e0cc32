"""`python -m embedding merge PART ... -o OUT.npz`: join the parts of a sharded `embed`."""

from __future__ import annotations

from convnext_common.cli import CommandError
from convnext_common.files import check_output_path


def register(subparsers):
    p = subparsers.add_parser(
        "merge",
        help="join the parts of a sharded `embed` run into one .npz",
        description="Join the outputs of `embed --shard-index I --num-shards N` (every "
        "shard once, same files and model) into one .npz equal to an unsharded run's.",
    )
    p.add_argument("parts", nargs="+", metavar="PART")
    p.add_argument("-o", "--output", required=True, help="output .npz")
    p.set_defaults(handler=run)


def run(args):
    from embedding.jobs import JobError, merge_parts  # the jobs module loads Keras

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
