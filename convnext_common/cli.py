"""The command lines' shared parts: the parser, argument types and the one exit policy.

Used by the interfaces only (`weights_convert.cli`, `embedding.cli`); no library
module imports it.

Exit policy (`run_command`): a handler raises, `run_command` is the one place that
reports. An `InputError` (bad images, checkpoints, outputs, arguments: every error
caused by what the user gave, `CommandError` for what only a command line checks)
and an `OSError` (a file that cannot be read or written) become one `error: ...`
line on stderr and exit status 2; Ctrl-C prints `error: interrupted` and exits with
130; running out of memory is one `error:` line and status 1; anything else is a
bug: still one `error: unexpected ...` line, status 1. `--debug` shows the
traceback of every error. Usage errors (argparse's) are one `error:` line and
status 2 too (`CommandLineParser`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from convnext_common.errors import InputError, error_message


class CommandError(InputError):
    """A failure that only the command line checks: printed as `error: ...`, exit status 2."""


class CommandLineParser(argparse.ArgumentParser):
    """argparse with this project's usage errors: one line, `error: ... (see PROG
    --help)`, exit status 2, instead of argparse's usage block and `PROG: error:`
    (subcommands' parsers are of the same class)."""

    def error(self, message):
        text = " ".join(str(message).split())
        self.exit(2, f"error: {text} (see {self.prog} --help)\n")


def parse_args(parser: argparse.ArgumentParser, argv, check=None) -> argparse.Namespace | int:
    """`parser.parse_args(argv)`, or the exit status of a usage error or `--help`
    (returned, not raised, so that `main` stays callable as a function). `check(parser,
    args)`, when given, refuses combinations argparse cannot express with
    `parser.error(...)`: the same one-line usage error."""
    try:
        args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
        if check is not None:
            check(parser, args)
        return args
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 0


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


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text!r}")
    return value


# ----------------------------------------------------------------------------
# The exit policy
# ----------------------------------------------------------------------------


def run_command(handler, args, *, debug: bool = False, user_errors=()) -> int:
    """`handler(args)`'s exit status, every failure reported by the policy above.

    `user_errors`: further exception types a command reports as input errors (a
    foreign library's, e.g. OpenCV's missing-extra ImportError)."""
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("\nerror: interrupted", file=sys.stderr)
        return 130
    except (InputError, OSError, *user_errors) as error:
        if debug:
            raise
        print(f"error: {error_message(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("error: out of memory (try a smaller --batch-size or input)", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: still one line; the traceback with --debug
        if debug:
            raise
        print(
            f"error: unexpected {type(error).__name__}: {error_message(error)} (a bug; rerun "
            "with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
