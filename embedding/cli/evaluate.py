"""`python -m embedding evaluate PAIRS --root ROOT`: EER, ROC AUC, TAR@FAR and k-fold
accuracy on an LFW-style pairs file, and optionally a calibrated operating point.

With `--embeddings FILE` (an `embed` output: .npz, .parquet or a folder of parts) the
pairs are scored with the file's vectors instead of embedding the images again: each
pair's paths are looked up among the file's paths (as real paths), images the file
lists as unreadable drop their pairs, and the model is the one the file was made with
(so `--model` is refused)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from convnext_common.cli import CommandError, positive_int
from convnext_common.files import atomic_write_text, check_output_path
from embedding.cli import options
from embedding.errors import ImageLoadError, PairsFileError
from embedding.formats import read_embeddings
from embedding.gallery.vectors import cosine_similarity
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
    p.add_argument(
        "--embeddings",
        default=None,
        metavar="FILE",
        help="score with the vectors of an `embed` output (.npz, .parquet or a folder of "
        "parts) instead of embedding the images; pairs are matched by path",
    )
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
    if args.embeddings is not None:
        if args.model is not None:
            raise CommandError(
                f"--embeddings {args.embeddings} fixes the model (the one it was made with); "
                "leave out --model"
            )
        if not os.path.exists(args.embeddings):
            raise CommandError(f"--embeddings {args.embeddings}: no such file or folder")


def usable_pairs(args, vectors=None):
    """(pairs, labels, folds) of the pairs file, pairs with missing images (not files, or
    with `vectors` not in the embeddings file) dropped when --skip-missing says so (else
    refused)."""
    pairs, labels, header_folds = read_pairs(args.pairs, args.root, args.ext.lstrip("."))
    folds = args.folds or header_folds or 10
    if vectors is None:
        missing, where = missing_images(pairs), f"under --root {args.root} (--ext {args.ext})"
    else:
        missing, where = vectors.missing(pairs), f"from --embeddings {args.embeddings}"
    if missing:
        listed = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        if not args.skip_missing:
            raise PairsFileError(
                f"{len(missing)} image(s) of {args.pairs} are missing {where}: {listed}; "
                "check --root and --ext, or pass --skip-missing"
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


class FileVectors:
    """The vectors of an embeddings file by real path, for `--embeddings`."""

    def __init__(self, path):
        rows = read_embeddings(path)
        self.vectors = {os.path.realpath(p): k for k, p in enumerate(rows.paths.tolist())}
        self.unreadable = dict(
            zip(
                map(os.path.realpath, rows.skipped.tolist()),
                rows.skipped_reason.tolist(),
                strict=True,
            )
        )
        self.rows = rows
        model = (rows.meta or {}).get("model") or {}
        self.source = model.get("source") or path
        self.dim = rows.dim

    def missing(self, pairs) -> list[str]:
        """The distinct images of `pairs` the file neither embeds nor lists as unreadable."""
        seen, out = set(), []
        for path in (p for pair in pairs for p in pair):
            key = os.path.realpath(path)
            if key not in seen and key not in self.vectors and key not in self.unreadable:
                out.append(path)
            seen.add(key)
        return out

    def pair_scores(self, pairs):
        """(scores, valid, failures) as `Embedder.pair_scores` gives them."""
        scores, failures, reported = [], [], set()
        for pair in pairs:
            keys = [os.path.realpath(p) for p in pair]
            bad = [(p, k) for p, k in zip(pair, keys, strict=True) if k not in self.vectors]
            for path, key in bad:
                if key not in reported:
                    reported.add(key)
                    failures.append(ImageLoadError(path, self.unreadable.get(key, "not in file")))
            if bad:
                scores.append(np.nan)
                continue
            first, second = (self.rows.embeddings[self.vectors[k]] for k in keys)
            scores.append(cosine_similarity(first, second))
        scores = np.asarray(scores, dtype=np.float64)
        return scores, ~np.isnan(scores), failures


def run(args):
    check_arguments(args)
    vectors = FileVectors(args.embeddings) if args.embeddings is not None else None
    pairs, labels, folds = usable_pairs(args, vectors)
    if vectors is None:
        embedder = options.make_embedder(args)
        scores, valid, failures = embedder.pair_scores(pairs, on_error="skip")
        source, dim = embedder.source, embedder.dim
    else:
        scores, valid, failures = vectors.pair_scores(pairs)
        source, dim = vectors.source, vectors.dim
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
    print(f"model: {source}  (dim {dim})")
    print(metrics.summary())
    record = metrics.to_dict()
    if args.target_far is not None:
        record["calibration"] = operating_point(args, scores, labels, source)
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
