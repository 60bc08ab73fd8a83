"""Class-name token spans on the real CLIP BPE, and the query embedding they select."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iosd.errors import UserError
from iosd.pipeline.text import class_embeddings, find_token_span
from iosd.pipeline.tiny import clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.mark.parametrize("name,pieces", [("hair drier", ["hair</w>", "drier</w>"]), ("potted plant", ["potted</w>", "plant</w>"]), ("hot dog", ["hot</w>", "dog</w>"]), ("cat", ["cat</w>"])])
def test_span_covers_exactly_the_class_tokens(tokenizer, name, pieces):
    text = f"a photograph of a {name}"
    start, end = find_token_span(tokenizer, text, name)
    ids = tokenizer(text).input_ids  # with BOS at 0, as the encoder sees it
    assert tokenizer.convert_ids_to_tokens(ids[start:end]) == pieces


def test_span_finds_a_class_inside_a_two_object_prompt(tokenizer):
    text = "A cinematic shot of a hot dog and an apple, portrayed naturally and realistically."
    start, end = find_token_span(tokenizer, text, "hot dog")
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids[start:end]) == ["hot</w>", "dog</w>"]


def test_empty_or_absent_names_are_refused(tokenizer):
    with pytest.raises(UserError, match="no tokens"):
        find_token_span(tokenizer, "a photograph of a ", "")
    with pytest.raises(UserError, match="does not appear"):
        find_token_span(tokenizer, "a photograph of a cat", "dog")


def test_embedding_is_the_mean_of_penultimate_states_over_name_tokens(tiny_loaded):
    pipe = tiny_loaded.pipe
    emb = class_embeddings(pipe, ["hair drier", "cat"])
    assert emb.shape == (2, 64)
    parts = []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok("a photograph of a hair drier", padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = enc(ids, output_hidden_states=True).hidden_states[-2][0]
        parts.append(hidden[5:7].mean(0))  # BOS a photograph of a | hair drier
    np.testing.assert_allclose(emb[0], torch.cat(parts).numpy(), atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
