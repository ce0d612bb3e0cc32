"""embedding.embedder: arguments of the wrong kind and NaN refused with their own error
types, naming the input.
"""

import os

import numpy as np
import pytest
from conftest import photo

import embedding.finetune as ft
from embedding import Embedder, load_image
from embedding.errors import (
    EmptyInputError,
    InputTypeError,
    NonFiniteError,
    UnsupportedInputError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Arguments: None, numbers, empty lists, None inside a list
# ----------------------------------------------------------------------------


def test_embed_arguments_of_the_wrong_kind(tiny_embedder):
    emb = tiny_embedder
    for bad in (None, 5, 2.5, {"a": 1}):
        with pytest.raises(InputTypeError, match="one image or a list of images") as info:
            emb.embed(bad)
        assert isinstance(info.value, TypeError) and "path" in str(info.value)
    for empty in ([], (), np.zeros((0, 8, 8, 3), np.uint8)):
        with pytest.raises(EmptyInputError, match="empty"):
            emb.embed(empty)
    good = photo("coffee")
    with pytest.raises(UnsupportedInputError, match=r"#1 \(None\).*NoneType.*path") as info:
        emb.embed([good, None])
    assert isinstance(info.value, TypeError) and info.value.index == 1
    result = emb.embed_many([good, None, 7, good], on_error="skip")
    assert result.indices.tolist() == [0, 3] and result.skipped == [1, 2]
    with pytest.raises(UnsupportedInputError, match="int"):
        load_image(7)


def test_verification_refuses_nan(tiny_embedder, tiny_keras):
    emb = tiny_embedder
    vector = emb.embed(photo("coffee"))[0]
    nan_vector = vector.copy()
    nan_vector[0] = np.nan
    for a, b in ((nan_vector, vector), (vector, np.full_like(vector, np.inf))):
        with pytest.raises(NonFiniteError, match="NaN or infinity"):
            emb.verify(a, b)
    for threshold in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="finite"):
            emb.verify(vector, vector, threshold=threshold)
        with pytest.raises(NonFiniteError):
            Embedder(model=emb.model, threshold=threshold)
    with pytest.raises(InputTypeError):
        emb.verify(vector, vector, threshold="0.5")
    assert emb.verify(vector, vector, threshold=0.9).verified


def test_nan_embeddings_are_refused(nan_keras):
    emb = Embedder(model=ft.load_model(nan_keras))
    with pytest.raises(NonFiniteError, match="NaN or infinite embeddings.*#0"):
        emb.embed(photo("coffee"))
    with pytest.raises(NonFiniteError):
        emb.verify(photo("coffee"), photo("chelsea"))
