"""embedding.files: one walker and one label rule for every command (embed, finetune,
enroll).
"""

import os

import numpy as np
import pytest
from conftest import TINY_CFG, photo
from PIL import Image

import embedding.finetune as ft
from embedding import Preprocessor
from embedding import cli as embedding_cli
from embedding.errors import (
    EmptyInputError,
)
from embedding.files import find_image_files, identity_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Folders: one walker, one label rule for embed and finetune
# ----------------------------------------------------------------------------


@pytest.fixture
def nested_people(tmp_path):
    root = tmp_path / "people"
    files = {
        "alice/1.jpg": "astronaut",
        "alice/sub/deeper/2.jpg": "astronaut",
        "alice/sub/3.PNG": "astronaut",
        "bob/1.png": "coffee",
        "bob/.hidden.jpg": "coffee",
        ".cache/4.jpg": "coffee",
        "carol/x/y/z/5.jpeg": "chelsea",
        "loose.jpg": "rocket",
    }
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(source)[:64, :64]).save(path, format="PNG")
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "alice" / "loop").symlink_to(root, target_is_directory=True)  # not followed
    return root


def test_one_walker_labels_by_top_level_folder(nested_people):
    root = str(nested_people)
    found = {os.path.relpath(f.path, root): (f.label, f.loose) for f in find_image_files([root])}
    assert found == {
        "alice/1.jpg": ("alice", False),
        "alice/sub/3.PNG": ("alice", False),
        "alice/sub/deeper/2.jpg": ("alice", False),
        "bob/1.png": ("bob", False),
        "carol/x/y/z/5.jpeg": ("carol", False),
        "loose.jpg": ("people", True),
    }
    given = find_image_files([os.path.join(root, "alice/sub/deeper/2.jpg")])
    assert [f.label for f in given] == ["deeper"]  # a file given by name: its folder
    labelled, loose = identity_folders(root)
    assert [f.label for f in labelled] == ["alice"] * 3 + ["bob", "carol"]
    assert [os.path.basename(f.path) for f in loose] == ["loose.jpg"]
    assert embedding_cli.find_images([root]) == [f.path for f in find_image_files([root])]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_image_files([os.path.join(root, "nowhere")])
    with pytest.raises(EmptyInputError, match="identity sub-folders"):
        identity_folders(os.path.join(root, "carol", "x", "y", "z"))


def test_embed_and_finetune_label_alike(nested_people, tiny_keras, tmp_path, capsys):
    root = str(nested_people)
    out = tmp_path / "v.npz"
    assert embedding_cli.main(["embed", root, "-o", str(out), "--model", tiny_keras]) == 0
    with np.load(out, allow_pickle=False) as data:
        labels = dict(zip(data["paths"].tolist(), data["labels"].tolist(), strict=True))
    assert labels[os.path.join(root, "alice", "sub", "deeper", "2.jpg")] == "alice"
    images = ft.ImageSet.from_folder(root, Preprocessor(TINY_CFG))
    by_name = dict(zip(images.names, images.identities.tolist(), strict=True))
    assert by_name[os.path.join("alice", "sub", "deeper", "2.jpg")] == "alice"
    assert images.loose == [os.path.join(root, "loose.jpg")]
