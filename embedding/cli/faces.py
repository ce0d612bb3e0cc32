"""`python -m embedding enroll PEOPLE_DIR -o FILE | --gallery LOCATION` and `identify IMAGE
--gallery LOCATION`: the face commands (the library side is `embedding.faces`). A LOCATION is
a gallery file, `sqlite:///PATH.db#NAME` or `postgresql://USER@HOST/DB#NAME`
(`embedding.gallery.stores`)."""

from __future__ import annotations

import contextlib

from convnext_common.cli import CommandError, finite_float
from convnext_common.files import file_problem
from embedding.cli import options
from embedding.faces import POLICIES, enroll_folder, identify, people_folders
from embedding.gallery import Gallery, GalleryNotFoundError, open_gallery
from embedding.gallery.store_base import parse_location
from embedding.images import load_image
from embedding.metrics import DEFAULT_THRESHOLD


def register(subparsers):
    p = subparsers.add_parser(
        "enroll",
        help="build a face gallery from PEOPLE_DIR/<name>/<photos>",
        description="Enrol people into a gallery (.npz, loads as embedding.Gallery): one "
        "sub-folder per person, named by the label, with one or more photos. The largest face "
        "of each photo is embedded; photos without a face (or unreadable) are reported and "
        "skipped.",
    )
    p.add_argument("people_dir", metavar="PEOPLE_DIR")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("-o", "--output", help="gallery file to write (.npz; replaced)")
    target.add_argument(
        "--gallery",
        metavar="LOCATION",
        help="gallery to add to (made if new): a file, sqlite:///PATH.db#NAME or "
        "postgresql://USER@HOST/DB#NAME; one transaction, each photo's path in the metadata",
    )
    options.add_face_options(p)
    options.add_model_options(p)
    p.set_defaults(handler=run_enroll)

    p = subparsers.add_parser(
        "identify",
        help="every face of an image with its best gallery match and a verdict",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument(
        "--gallery",
        required=True,
        metavar="LOCATION",
        help="gallery written by `enroll`: a file, sqlite:///PATH.db#NAME or "
        "postgresql://USER@HOST/DB#NAME",
    )
    p.add_argument(
        "--threshold",
        type=finite_float,
        default=None,
        help=f"a match needs similarity >= T (default: {DEFAULT_THRESHOLD}, uncalibrated; "
        "`evaluate` prints calibrated thresholds)",
    )
    p.add_argument(
        "--policy", choices=POLICIES, default="all", help="which faces to report (default all)"
    )
    options.add_face_options(p)
    options.add_model_options(p)
    p.set_defaults(handler=run_identify)


def _check_gallery_location(location):
    """Reach the gallery before the model loads: a bad location, an unreachable database or
    a damaged file fails now; a gallery that does not exist yet is made after embedding."""
    parse_location(location)
    with contextlib.suppress(GalleryNotFoundError):
        open_gallery(location, create=False).close()


def run_enroll(args):
    people_folders(args.people_dir)  # fail on an empty folder before loading the model
    if args.gallery:
        _check_gallery_location(args.gallery)
    face_options = options.face_options(args)
    embedder = options.make_embedder(args)
    result = enroll_folder(embedder, args.people_dir, **face_options)
    options.print_skipped(result.skipped)
    counts = result.counts()
    for label, count in counts.items():
        print(f"enrolled {label}: {count} photo{'s' if count != 1 else ''}")
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    if args.output:
        result.gallery.save(args.output)
        print(
            f"wrote {args.output}: {len(result.gallery)} faces of {len(counts)} people "
            f"(dim {result.gallery.dim}){skipped}"
        )
        return 0
    with open_gallery(args.gallery, create=True, dim=result.gallery.dim) as gallery:
        ids = gallery.add(
            result.gallery.embeddings,
            result.gallery.labels,
            [{"photo": source} for source in result.sources],
        )
        print(
            f"added to {gallery.location}: {len(ids)} faces of {len(counts)} people "
            f"(ids {ids.min()}-{ids.max()}; it holds {len(gallery)}){skipped}"
        )
    return 0


def run_identify(args):
    if parse_location(args.gallery).kind == "path":
        problem = file_problem(args.gallery)
        if problem is not None:
            what = "no such gallery file" if problem == "no such file" else problem
            raise CommandError(f"{args.gallery}: {what} (make one with `enroll`)")
    try:
        gallery = Gallery.open(args.gallery, create=False)
    except (ValueError, LookupError) as error:  # damaged, foreign, absent: named, no traceback
        raise CommandError(str(error)) from None
    image = load_image(args.image)  # an unreadable image fails before the model loads
    face_options = options.face_options(args)
    embedder = options.make_embedder(args)
    found = identify(
        embedder, image, gallery, threshold=args.threshold, policy=args.policy, **face_options
    )
    if not found:
        raise CommandError(f"{args.image}: no face found (min size {args.min_size:g} px)")
    for number, match in enumerate(found, start=1):
        box = ", ".join(f"{v:g}" for v in match.face.box)
        score = "-" if match.face.score is None else f"{match.face.score:.4g}"
        verdict = "MATCH" if match.matched else "UNKNOWN"
        print(
            f"face {number}: box [{box}] detector_score {score} "
            f"best {match.label} similarity {match.score:.6f} {verdict}"
        )
    note = "" if args.threshold is not None else " (uncalibrated default; pass --threshold)"
    print(f"threshold: {found[0].threshold:g}{note}")
    return 0
