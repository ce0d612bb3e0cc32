"""Command line: `python -m embedding COMMAND ...` (demo, embed, merge, verify, evaluate,
finetune, enroll, identify, gallery, export, serve).

One module per subcommand (the faces module has two), each with `register(subparsers)`
adding its parser and setting `handler=` to the function that runs it; `SUBCOMMANDS`
lists the modules, so adding a subcommand is one module and one import here. The
modules import Keras only inside their handlers, so `--help` is instant and `--backend`
can still pick the Keras backend.

Errors: a handler raises; `main` reports, by the project's one exit policy
(`convnext_common.cli.run_command`): every `InputError` (bad images, pairs files,
outputs, models, fine-tuning data, and `CommandError` for what only the command line
checks) and `OSError` is one `error: ...` line on stderr with exit status 2; Ctrl-C
exits with 130; anything else is a bug, one `error: unexpected ...` line and status 1;
the global `--debug` shows the traceback of every error. Handlers check what is cheap
first (arguments, input files, whether the outputs can be written) and only then load
a model or start work.
"""

from __future__ import annotations

import os
import sys
import warnings

from PIL import Image

from convnext_common.cli import CommandError, CommandLineParser, parse_args, run_command
from embedding.cli import (
    demo,
    embed,
    evaluate,
    export,
    faces,
    finetune,
    gallery,
    merge,
    serve,
    verify,
)
from embedding.cli.options import find_images
from embedding.files import IMAGE_EXTENSIONS
from embedding.pairs import read_pairs

SUBCOMMANDS = (demo, embed, merge, verify, evaluate, finetune, faces, gallery, export, serve)
# the module's names before it became a package, kept: scripts and tests use them
__all__ = [
    "IMAGE_EXTENSIONS", "SUBCOMMANDS", "CommandError", "build_parser", "find_images", "main",
    "read_pairs",
]  # fmt: skip


def build_parser() -> CommandLineParser:
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
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv=None) -> int:
    """`python -m embedding ...`: the exit status (usage errors: one `error:` line, 2)."""
    args = parse_args(build_parser(), argv)
    if isinstance(args, int):
        return args
    if args.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
            print("error: --backend must be chosen before Keras is imported", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    # images above the pixel limit are refused (and reported) by the preprocessing itself
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return run_command(args.handler, args, debug=args.debug)
