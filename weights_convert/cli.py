"""`python -m weights_convert SOURCE -o OUT`: convert a timm checkpoint, from the shell.

OUT.keras / OUT.weights.h5 is a Keras model; OUT.onnx, OUT.tflite, OUT.xml (OpenVINO)
or a folder (SavedModel) is an export for deployment (`weights_convert.export`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from convnext_common.cli import CommandError, CommandLineParser, parse_args, run_command
from convnext_common.files import check_output_path
from weights_convert.export import (  # no Keras: `--help` builds its options from here
    DTYPES,
    FORMATS,
    SUFFIXES,
    check_backend_supports,
    check_export_options,
    check_output,
    export_model,
    format_for_path,
)
from weights_convert.pretrained import DEFAULT_MODEL, license_notice  # no Keras either


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m weights_convert",
        description="Convert a timm ConvNeXt / ConvNeXt V2 safetensors checkpoint to Keras.",
    )
    parser.add_argument(
        "source",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"Hub id, .safetensors file or folder (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "-o",
        "--output",
        help="OUT.keras or OUT.weights.h5; or an export: OUT.onnx, OUT.tflite, OUT.xml "
        "(OpenVINO), or a folder OUT/ (SavedModel); -o or --preset is needed",
    )
    parser.add_argument(
        "--preset",
        metavar="DIR",
        help="write a keras-hub preset folder (config.json, model.weights.h5, metadata.json, "
        "README.md model card with the parity against timm)",
    )
    parser.add_argument(
        "--upload",
        metavar="hf://OWNER/REPO",
        help="with --preset: push the preset to this Hugging Face Hub repository",
    )
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
        help="fixed input height and width (default: any size; an export: the checkpoint's "
        "input size)",
    )
    add_export_options(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


# ----------------------------------------------------------------------------
# Export options (shared with `python -m embedding export`)
# ----------------------------------------------------------------------------


def add_export_options(parser: argparse.ArgumentParser, input_size: bool = False) -> None:
    """--format, --dtype, --batch-size, --dynamic-size, --with-normalization, --uint8
    (and --input-size when `input_size`)."""
    group = parser.add_argument_group("export (ONNX, LiteRT, SavedModel, OpenVINO)")
    group.add_argument(
        "--format", choices=FORMATS, help="export format (default: from the output's suffix)"
    )
    group.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="LiteRT: float16 or dynamic-range int8"
    )
    group.add_argument(
        "--batch-size", type=int, metavar="N", help="fixed batch size (default: dynamic)"
    )
    if input_size:
        group.add_argument(
            "--input-size",
            type=int,
            nargs=2,
            metavar=("H", "W"),
            help="fixed input height and width (default: the checkpoint's input size)",
        )
    group.add_argument("--dynamic-size", action="store_true", help="any input height and width")
    group.add_argument(
        "--with-normalization",
        action="store_true",
        help="mean/std inside the graph: the model takes resized, cropped RGB in [0, 1]",
    )
    group.add_argument(
        "--uint8", action="store_true", help="with --with-normalization: take 0..255 uint8 pixels"
    )


def is_export(args) -> bool:
    """Whether the output asks for an export rather than a Keras file."""
    # loads Keras: imported once a conversion runs, so --help is instant
    from weights_convert.saving import OUTPUT_SUFFIXES

    output = args.output
    if output.endswith(OUTPUT_SUFFIXES) and not args.format:
        return False  # a Keras file (an existing folder of that name is refused later)
    return bool(
        args.format
        or output.endswith(tuple(SUFFIXES))
        or output.endswith(("/", os.sep))
        or os.path.isdir(output)
    )


def export_options(args) -> dict:
    """`export_model` keyword arguments from the options of `add_export_options`, checked
    (with the output path and the active backend) before any model is loaded."""
    format = format_for_path(args.output, args.format)
    options = {
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "input_size": None if args.input_size is None else tuple(args.input_size),
        "dynamic_size": args.dynamic_size,
        "with_normalization": args.with_normalization,
        "input_dtype": "uint8" if args.uint8 else "float32",
    }
    check_export_options(format, **options)
    check_backend_supports(format)
    check_output(args.output, format)
    return {"format": format, **options}


def print_export(description, output, seconds) -> None:
    out = description["outputs"][0]
    where = description["export"]
    print(
        f"{description['timm_architecture']}: {where['format']} ({where['dtype']}, "
        f"{where['backend']} backend), input {description['input']['shape']} "
        f"{description['input']['dtype']}, output {out['kind']} {out['shape']}, licence "
        f"{description['license'] or 'unknown'}, exported in {seconds:.2f} s -> {output}"
    )
    if description["license_notice"]:
        print(f"note: {description['license_notice']}", file=sys.stderr)


def run_export(args) -> int:
    options = export_options(args)  # before any work
    if args.num_classes is not None and args.num_classes < 0:
        raise CommandError(f"--num-classes must be >= 0, got {args.num_classes}.")
    from weights_convert.convert import load_timm  # loads Keras: once the options are checked

    start = time.perf_counter()
    model = load_timm(
        args.source,
        arch=args.arch,
        include_top=not args.no_top,
        num_classes=args.num_classes,
        verbose=not args.quiet,
    )
    description = export_model(model, args.output, **options)
    print_export(description, args.output, time.perf_counter() - start)
    return 0


def check_outputs_given(parser, args) -> None:
    """A usage error without -o or --preset, or with --upload but no --preset."""
    if args.upload is not None and args.preset is None:
        parser.error("--upload pushes the preset: it needs --preset DIR")
    if args.output is None and args.preset is None:
        parser.error("the following arguments are required: -o/--output (or --preset DIR)")


def check_preset_options(args) -> None:
    """The --preset / --upload combination and the preset folder, checked before any work."""
    if args.preset is None:
        return
    exporting = args.format or args.with_normalization or args.uint8 or args.dynamic_size
    if args.output is None and (exporting or args.input_size is not None):
        raise CommandError(
            "--format, --with-normalization, --uint8, --dynamic-size and --input-size need -o "
            "OUT; a preset takes any input size."
        )
    # convnext_layers loads Keras: imported only when a preset is asked for
    from convnext_layers.presets import check_preset_target, parse_hub_uri

    if args.upload is not None:
        parse_hub_uri(args.upload)
    check_preset_target(args.preset)


def run_preset(args) -> int:
    """--preset DIR [--upload hf://OWNER/REPO]: the converted model as a keras-hub preset."""
    # both load Keras: imported when a preset is written, so --help is instant
    from convnext_layers.presets import upload_preset
    from weights_convert.presets import write_preset

    start = time.perf_counter()
    model = write_preset(
        args.source,
        args.preset,
        arch=args.arch,
        include_top=not args.no_top,
        num_classes=args.num_classes,
        verbose=not args.quiet,
    )
    from convnext_layers.model_card import parity_line  # loads Keras (convnext_layers)

    with open(os.path.join(args.preset, "metadata.json"), encoding="utf-8") as f:
        parity = json.load(f).get("parity")
    print(
        f"{model.timm_architecture}: preset written in {time.perf_counter() - start:.2f} s -> "
        f"{args.preset} (parity with timm: {parity_line(parity)})"
    )
    if args.upload is not None:
        repo_id = upload_preset(args.upload, args.preset)
        print(f"uploaded {args.preset} -> https://huggingface.co/{repo_id}")
    return 0


def run(args) -> int:
    check_preset_options(args)  # before any work
    status = 0
    if args.output is not None:
        status = run_export(args) if is_export(args) else run_keras_file(args)
    if status == 0 and args.preset is not None:
        status = run_preset(args)
    return status


def run_keras_file(args) -> int:
    if args.format or args.dtype != "float32" or args.batch_size or args.dynamic_size:
        raise CommandError(
            "--format, --dtype, --batch-size and --dynamic-size are export options: the output "
            "must be .onnx, .tflite, .xml or a folder (SavedModel)."
        )
    if args.with_normalization or args.uint8:
        raise CommandError(
            "--with-normalization and --uint8 are export options: the output must be .onnx, "
            ".tflite, .xml or a folder (SavedModel)."
        )
    # loads Keras: imported once a conversion runs, so --help is instant
    from weights_convert.saving import OUTPUT_SUFFIXES, save_converted

    if not args.output.endswith(OUTPUT_SUFFIXES):
        raise CommandError(
            f"The output {args.output!r} must end in {' or '.join(OUTPUT_SUFFIXES)} (a Keras "
            f"model), or be an export: {', '.join(SUFFIXES)} or a folder/ (SavedModel)."
        )
    output = check_output_path(args.output, option="-o", suffixes=OUTPUT_SUFFIXES)  # before work
    if args.num_classes is not None and args.num_classes < 0:
        raise CommandError(f"--num-classes must be >= 0, got {args.num_classes}.")
    if args.input_size is not None and min(args.input_size) < 2:
        raise CommandError(f"--input-size must be at least 2 2, got {args.input_size}.")
    from weights_convert.convert import load_timm  # loads Keras: once the options are checked

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
    """`python -m weights_convert ...`: the exit status (the policy of
    `convnext_common.cli.run_command`: one `error:` line for every bad input)."""
    args = parse_args(build_parser(), argv, check=check_outputs_given)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run_command(run, args, debug=args.debug)
