"""`python -m embedding evaluate PAIRS --root ROOT`: EER, ROC AUC, TAR@FAR and k-fold
accuracy on an LFW-style pairs file, and optionally a calibrated operating point."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from convnext_common.cli import CommandError, positive_int
from convnext_common.files import atomic_write_text, check_output_path
from embedding.cli import options
from embedding.errors import PairsFileError
from embedding.metrics import calibrate, verification_metrics
from embedding.pairs import missing_images, read_pairs


def register(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="EER, ROC AUC, TAR@FAR and k-fold accuracy on an LFW-style pairs file",
    )
    p.add_argument("pairs", help="pairs file (header '10 300', then pair lines)")
    p.add_argument("--root", required=True, help="image folder: ROOT/name/name_0001.jpg")
    p.add_argument("--ext", default="jpg", help="image file extension (default jpg)")
    p.add_argument(
        "--folds",
        type=positive_int,
        default=None,
        help="k for k-fold accuracy, at least 2 (default: from header, 10)",
    )
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="drop the pairs whose images are missing instead of refusing the file",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    group = p.add_argument_group("operating point")
    group.add_argument(
        "--target-far",
        type=float,
        default=None,
        metavar="F",
        help="also choose the threshold whose false-accept rate is at most F (e.g. 1e-3), "
        "with bootstrap confidence intervals",
    )
    group.add_argument(
        "--bootstrap", type=int, default=1000, metavar="N", help="resamples (default 1000)"
    )
    group.add_argument("--confidence", type=float, default=0.95, help="interval level")
    group.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    group.add_argument(
        "--save-calibration",
        default=None,
        metavar="FILE",
        help="write the operating point as JSON, for `verify --calibration FILE`",
    )
    options.add_model_options(p)
    p.set_defaults(handler=run)


def check_arguments(args):
    """Refuse what cannot work before any image is read."""
    if not os.path.isdir(args.root):
        what = "a file, not a folder" if os.path.exists(args.root) else "no such folder"
        raise CommandError(f"--root {args.root}: {what}")
    if args.folds is not None and args.folds < 2:
        raise CommandError(f"--folds {args.folds}: k-fold accuracy needs at least 2 folds")
    if args.json:
        check_output_path(args.json, option="--json")
    if args.save_calibration:
        if args.target_far is None:
            raise CommandError("--save-calibration needs --target-far")
        check_output_path(args.save_calibration, option="--save-calibration")
    if args.target_far is not None and not 0.0 <= args.target_far <= 1.0:
        raise CommandError(f"--target-far must lie in [0, 1], got {args.target_far}")
    if args.bootstrap < 0 or not 0.0 < args.confidence < 1.0:
        raise CommandError("--bootstrap must be >= 0 and --confidence in (0, 1)")


def usable_pairs(args):
    """(pairs, labels, folds) of the pairs file, pairs with missing images dropped when
    --skip-missing says so (else refused)."""
    pairs, labels, header_folds = read_pairs(args.pairs, args.root, args.ext.lstrip("."))
    folds = args.folds or header_folds or 10
    missing = missing_images(pairs)
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        if not args.skip_missing:
            raise PairsFileError(
                f"{len(missing)} image(s) of {args.pairs} are missing under --root {args.root} "
                f"(--ext {args.ext}): {listed}; check --root and --ext, or pass --skip-missing"
            )
        gone = set(missing)
        keep = [k for k, pair in enumerate(pairs) if not gone.intersection(pair)]
        print(
            f"warning: {len(missing)} image(s) missing ({listed}); "
            f"{len(pairs) - len(keep)} of {len(pairs)} pairs dropped",
            file=sys.stderr,
        )
        pairs, labels = [pairs[k] for k in keep], [labels[k] for k in keep]
    check_pair_labels(labels, folds, args.pairs)
    return pairs, labels, folds


def run(args):
    check_arguments(args)
    pairs, labels, folds = usable_pairs(args)
    embedder = options.make_embedder(args)
    scores, valid, failures = embedder.pair_scores(pairs, on_error="skip")
    if failures:
        options.print_skipped((failure.name, failure.reason) for failure in failures[:10])
        print(
            f"warning: {len(failures)} image(s) unreadable, {int((~valid).sum())} of "
            f"{len(pairs)} pairs dropped",
            file=sys.stderr,
        )
    scores, labels = scores[valid], np.asarray(labels)[valid]
    check_pair_labels(labels.tolist(), folds, args.pairs)
    try:
        metrics = verification_metrics(scores, labels, folds=folds)
    except ValueError as error:  # e.g. a fold whose other folds hold one kind of pair only
        raise PairsFileError(f"{args.pairs}: {error}") from error
    print(f"model: {embedder.source}  (dim {embedder.dim})")
    print(metrics.summary())
    record = metrics.to_dict()
    if args.target_far is not None:
        record["calibration"] = operating_point(args, scores, labels, embedder.source)
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


def operating_point(args, scores, labels, source) -> dict:
    """The calibration at --target-far, printed and (--save-calibration) written."""
    try:
        calibration = calibrate(
            scores,
            labels,
            args.target_far,
            n_bootstrap=args.bootstrap,
            confidence=args.confidence,
            seed=args.seed,
            model=str(source),
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(calibration.summary())
    if args.save_calibration:
        try:
            calibration.save(args.save_calibration)
        except OSError as error:
            raise CommandError(f"cannot write {args.save_calibration}: {error}") from None
        print(f"wrote {args.save_calibration}")
    return calibration.to_dict()


def check_pair_labels(labels, folds, path):
    """Refuse pairs that cannot give the metrics: both kinds needed, a pair per fold."""
    same = sum(1 for label in labels if label == 1)
    different = len(labels) - same
    if same == 0 or different == 0:
        raise PairsFileError(
            f"{path}: {same} same-person and {different} different-person pairs usable; "
            "the metrics need both"
        )
    if len(labels) < folds:
        raise PairsFileError(
            f"{path}: {len(labels)} usable pairs cannot fill {folds} folds; pass --folds "
            f"{max(2, min(len(labels), 10))} or fewer"
        )
