"""`python -m embedding verify IMAGE1 IMAGE2`: the similarity of two images and a verdict."""

from __future__ import annotations

from convnext_common.cli import CommandError, finite_float
from convnext_common.files import file_problem
from embedding.cli import options
from embedding.metrics import DEFAULT_THRESHOLD, Calibration, CalibrationError


def register(subparsers):
    p = subparsers.add_parser(
        "verify", help="similarity of two images and a same/different verdict"
    )
    p.add_argument("image1")
    p.add_argument("image2")
    choice = p.add_mutually_exclusive_group()
    choice.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help=f"accept when similarity >= T (default: {DEFAULT_THRESHOLD}, uncalibrated; "
        "`evaluate` prints calibrated thresholds)",
    )
    choice.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="take the threshold from a calibration JSON (`evaluate --target-far F "
        "--save-calibration FILE`) or from a gallery .npz saved with one",
    )
    options.add_model_options(p)
    p.set_defaults(handler=run)


def run(args):
    for name, path in (("image1", args.image1), ("image2", args.image2)):
        problem = file_problem(path)
        if problem is not None:
            raise CommandError(f"{name} {path}: {problem}")
    calibration = None
    if args.calibration is not None:
        try:
            calibration = Calibration.load(args.calibration)
        except CalibrationError as error:
            raise CommandError(f"--calibration {args.calibration}: {error}") from None
    embedder = options.make_embedder(args, calibration=calibration)
    result = embedder.verify(args.image1, args.image2, threshold=args.threshold)
    note = {
        "given": "",
        "calibrated": " (calibrated)",
        "default": " (uncalibrated default; calibrate with `evaluate` and pass --threshold)",
    }[result.threshold_source]
    if result.calibration is not None:
        c = result.calibration
        note = (
            f" (calibrated at FAR <= {c.target_far:g}: FAR {c.far:.2g}, FRR {c.frr:.4f} on "
            f"{c.n_genuine} genuine / {c.n_impostor} impostor pairs; {args.calibration})"
        )
    print(f"similarity: {result.similarity:.6f}")
    print(f"threshold:  {result.threshold:.6f}{note}")
    print(f"verdict:    {'SAME' if result.verified else 'DIFFERENT'}")
    return 0
