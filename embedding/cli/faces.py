"""`python -m embedding enroll PEOPLE_DIR -o GALLERY` and `identify IMAGE --gallery GALLERY`:
the face commands (the library side is `embedding.faces`)."""

from __future__ import annotations

from convnext_common.cli import CommandError, finite_float
from convnext_common.files import file_problem
from embedding.cli import options
from embedding.faces import POLICIES, enroll_folder, identify, people_folders
from embedding.gallery import Gallery
from embedding.metrics import DEFAULT_THRESHOLD
from embedding.preprocess import load_image


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
    p.add_argument("-o", "--output", required=True, help="gallery file to write (.npz)")
    options.add_face_options(p)
    options.add_model_options(p)
    p.set_defaults(handler=run_enroll)

    p = subparsers.add_parser(
        "identify",
        help="every face of an image with its best gallery match and a verdict",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--gallery", required=True, help="gallery written by `enroll`")
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


def run_enroll(args):
    people_folders(args.people_dir)  # fail on an empty folder before loading the model
    face_options = options.face_options(args)
    embedder = options.make_embedder(args)
    result = enroll_folder(embedder, args.people_dir, **face_options)
    options.print_skipped(result.skipped)
    counts = result.counts()
    for label, count in counts.items():
        print(f"enrolled {label}: {count} photo{'s' if count != 1 else ''}")
    result.gallery.save(args.output)
    print(
        f"wrote {args.output}: {len(result.gallery)} faces of {len(counts)} people "
        f"(dim {result.gallery.dim})"
        + (f", {len(result.skipped)} skipped" if result.skipped else "")
    )
    return 0


def run_identify(args):
    problem = file_problem(args.gallery)
    if problem is not None:
        what = "no such gallery file" if problem == "no such file" else problem
        raise CommandError(f"{args.gallery}: {what} (make one with `enroll`)")
    try:
        gallery = Gallery.load(args.gallery)
    except ValueError as error:  # any damaged or foreign file: named, never a traceback
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
