"""`python -m weights_convert SOURCE -o OUT`: convert a timm checkpoint, from the shell."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from weights_convert.checkpoint import DEFAULT_MODEL
from weights_convert.errors import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert a timm ConvNeXt / ConvNeXt V2 safetensors checkpoint to Keras.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"Hub id, .safetensors file or folder (default {DEFAULT_MODEL})",
    )
    parser.add_argument("-o", "--output", required=True, help="OUT.keras or OUT.weights.h5")
    parser.add_argument("--arch", help="timm architecture, overriding config.json / inference")
    parser.add_argument(
        "--num-classes", type=int, help="classifier size (default: as saved; 0: pre-logits)"
    )
    parser.add_argument("--no-top", action="store_true", help="backbone only, no head")
    parser.add_argument(
        "--input-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="fixed input height and width (default: any size)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run(args) -> int:
    from weights_convert.files import check_writable
    from weights_convert.pretrained import license_notice
    from weights_convert.saving import OUTPUT_SUFFIXES, save_converted

    output = check_writable(args.output, suffixes=OUTPUT_SUFFIXES)  # before any work
    if args.num_classes is not None and args.num_classes < 0:
        raise ValueError(f"--num-classes must be >= 0, got {args.num_classes}.")
    if args.input_size is not None and min(args.input_size) < 2:
        raise ValueError(f"--input-size must be at least 2 2, got {args.input_size}.")
    from weights_convert.convert import load_timm

    start = time.perf_counter()
    model = load_timm(
        args.source,
        arch=args.arch,
        include_top=not args.no_top,
        num_classes=args.num_classes,
        input_shape=None if args.input_size is None else (*args.input_size, 3),
        verbose=not args.quiet,
    )
    converted = time.perf_counter() - start
    save_converted(model, output)
    saved = time.perf_counter() - start - converted
    license_name = model.pretrained_cfg.get("license", "unknown")
    print(
        f"{model.timm_architecture}: {model.count_params():,} parameters, licence "
        f"{license_name}, converted in {converted:.2f} s, saved in {saved:.2f} s -> {output}"
    )
    notice = license_notice(model.pretrained_cfg)
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = None if argv is None else [os.fspath(a) for a in argv]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (*USER_ERRORS, ValueError, OSError, MemoryError) as error:
        if args.debug:
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except Exception as error:  # a bug: still one line, the traceback with --debug
        if args.debug:
            raise
        print(
            f"error: unexpected {type(error).__name__}: {_one_line(error)} (rerun with --debug "
            "for the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(error) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    return " ".join(line.strip() for line in text.splitlines())
