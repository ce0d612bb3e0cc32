"""`python -m embedding gallery copy SRC DST` and `gallery list STORE`: moving galleries
between stores (a file or folder, sqlite:///PATH, postgresql://...) and seeing what a store
holds (the library side is `embedding.gallery`)."""

from __future__ import annotations

import os

from convnext_common.cli import CommandError
from embedding.gallery import INDEX_TYPES, copy_gallery, open_gallery, open_store
from embedding.gallery.store_base import parse_location

LOCATIONS = (
    "a gallery file (.npz), a folder of them, sqlite:///PATH.db or postgresql://USER@HOST/DB; "
    "#NAME after a database location names one gallery"
)


def register(subparsers):
    p = subparsers.add_parser(
        "gallery",
        help="copy galleries between stores (files, SQLite, PostgreSQL), list a store",
        description=f"Gallery locations: {LOCATIONS}.",
    )
    commands = p.add_subparsers(dest="gallery_command", metavar="ACTION", required=True)
    copy = commands.add_parser(
        "copy",
        help="copy a gallery (or every gallery of a store) into another store",
        description="Copy SRC into DST with ids, labels, metadata and calibration kept. SRC "
        "is one gallery (a .npz file, or a database location with #NAME) or a whole store (a "
        "folder, a database location without #NAME: every gallery, by name). DST is a "
        "gallery of the same kind, or a store (the gallery keeps its name); a DST gallery "
        "must be new or empty. A DST path ending in .npz is a file, any other a folder.",
    )
    copy.add_argument("source", metavar="SRC")
    copy.add_argument("destination", metavar="DST")
    copy.add_argument(
        "--index",
        choices=sorted({*INDEX_TYPES, "hnsw", "exact"}),
        default=None,
        help="the destination's index (default: the destination store's: exact for files "
        "and SQLite, hnsw for PostgreSQL)",
    )
    listing = commands.add_parser("list", help="the galleries of a store, with their sizes")
    listing.add_argument("store", metavar="STORE")
    p.set_defaults(handler=run)


def _is_store(location: str) -> bool:
    """Whether a location names a whole store (not one gallery)."""
    parsed = parse_location(location)
    if parsed.kind == "path":
        return os.path.isdir(parsed.target) or not parsed.target.endswith(".npz")
    return parsed.name is None


def _galleries(source: str):
    """[(name, gallery)] of SRC: one gallery, or every gallery of a store."""
    if not _is_store(source):
        gallery = open_gallery(source)
        return [(gallery.name, gallery)]
    store = open_store(source)
    names = store.names()
    if not names:
        raise CommandError(f"{source}: the store holds no gallery.")
    return [(name, store.gallery(name)) for name in names]


def _destination(destination: str, name: str, dim, index):
    if _is_store(destination):
        return open_store(destination).gallery(name, dim=dim, create=True, index=index)
    return open_gallery(destination, create=True, dim=dim, index=index)


def run_copy(args):
    sources = _galleries(args.source)
    if len(sources) > 1 and not _is_store(args.destination):
        raise CommandError(
            f"{args.source} holds {len(sources)} galleries; DST must be a store (a folder, or "
            "a database location without #NAME)."
        )
    for name, source in sources:
        target = _destination(args.destination, name, source.dim, args.index)
        count = copy_gallery(source, target)
        print(f"copied {name}: {count} vectors -> {target.location}")
    return 0


def run_list(args):
    store = open_store(args.store)
    names = store.names()
    for name in names:
        gallery = store.gallery(name)
        print(
            f"{name}: {len(gallery)} vectors, {len(gallery.counts())} labels, dim {gallery.dim}, "
            f"index {gallery.index_type}"
        )
    if not names:
        print(f"{args.store}: no galleries")
    return 0


def run(args):
    try:
        return run_copy(args) if args.gallery_command == "copy" else run_list(args)
    except (ValueError, TypeError, LookupError) as error:  # a refusal, named: never a traceback
        raise CommandError(str(error).strip("'\"")) from None
