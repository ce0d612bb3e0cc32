"""The base of every failure caused by what a user gave, and the errors shared by packages.

Every failure that bad input can cause (a file, an argument, a checkpoint, a data
folder, an output path) is an `InputError` subclass that is also the builtin type a
Python caller expects (`ValueError`, `TypeError`, `FileNotFoundError`, ...). The
command lines (`convnext_common.cli.run_command`) report an `InputError` as one
`error: ...` line and exit status 2, never as a traceback; anything else is a bug.

To report a new kind of problem: subclass `InputError` and the builtin type that fits,
raise it with a message naming the input, what is wrong with it and what is accepted.
"""

from __future__ import annotations


class InputError(Exception):
    """Base of the failures caused by what the user gave (reported without a traceback)."""


class OutputPathError(InputError, ValueError):
    """An output path that cannot be written (a folder, a read-only place, a wrong suffix)."""


def without_traceback(error: BaseException) -> BaseException:
    """`error` with its traceback and chained exceptions dropped.

    An exception kept for later (a skipped image's error in a result list) must
    not keep the frames that raised it alive: their locals can hold open files.
    """
    error.__traceback__ = None
    error.__cause__ = None
    error.__context__ = None
    return error


def error_message(error: BaseException) -> str:
    """One line describing `error`: its message, or an OS error's reason and its file(s)."""
    if isinstance(error, OSError) and error.strerror:
        names = [n for n in (error.filename, error.filename2) if n is not None]
        text = error.strerror + (": " + " -> ".join(map(str, names)) if names else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())  # one line, whatever the message held
