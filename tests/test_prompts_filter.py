"""Prompt construction (GD templates, IOSD's negative class) and the mask filter's decisions."""

from __future__ import annotations

import numpy as np
import pytest

from iosd.errors import UserError
from iosd.pipeline.filter import judge
from iosd.pipeline.prompts import PromptSpec, make_prompt
from iosd.pipeline.writer import add_counts
from iosd.recipes import get_recipe
from iosd.schema import EMPTY_MASK, KEPT, LOW_SCORE, NOT_TARGET

CLASSES = ("cat", "dog", "apple", "hot dog")


def prompts(spec: PromptSpec, n: int = 200, query: str | None = None) -> list[tuple[str, list[str]]]:
    rng = np.random.default_rng(0)
    made = [make_prompt(rng, CLASSES, spec, query) for _ in range(n)]
    if not spec.negative:
        assert all(targets == names for _, names, targets in made)  # every shown class is a target
    return [(prompt, names) for prompt, names, _ in made]


def test_gd_one_object_template():
    for prompt, names in prompts(PromptSpec()):
        assert prompt == f"a photograph of a {names[0]}" and len(names) == 1 and names[0] in CLASSES


def test_two_objects_name_two_different_classes_and_mix_gives_both_kinds():
    for prompt, names in prompts(PromptSpec(objects="2")):
        assert len(names) == 2 and names[0] != names[1]
        assert prompt == f"a photograph of a {names[0]} and a {names[1]}"
    kinds = {len(names) for _, names in prompts(PromptSpec(objects="mix"))}
    assert kinds == {1, 2}


def test_negative_prompt_holds_the_query_and_another_class_in_random_order():
    official = get_recipe("iosd").value("gen", "template2")
    assert official == "A cinematic shot of a {} and a {}, naturally and realistically."
    rng = np.random.default_rng(0)
    made = [make_prompt(rng, CLASSES, PromptSpec(template2=official, negative=True), "apple") for _ in range(200)]
    positions = set()
    for prompt, names, targets in made:
        assert len(names) == 2 and "apple" in names and names[0] != names[1]
        assert prompt == official.format(*names)
        assert targets == ["apple"]  # the query is the only supervised class (DSFP)
        positions.add(names.index("apple"))
    assert positions == {0, 1}  # the query comes first or second
    assert {n for _, names, _ in made for n in names} == set(CLASSES)  # every other class can be the negative


def test_negative_prompt_needs_two_classes():
    with pytest.raises(UserError, match="at least two classes"):
        make_prompt(np.random.default_rng(0), ("cat",), PromptSpec(negative=True))


@pytest.mark.parametrize("spec, message", [
    (PromptSpec(template="a photo"), "exactly one"),
    (PromptSpec(template2="{} only"), "needs two"),
    (PromptSpec(objects="3"), "--objects"),
])
def test_bad_templates_are_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        spec.check()


def test_filter_keeps_confident_non_empty_masks_and_records_every_decision():
    full = np.ones((4, 4), bool)
    empty = np.zeros((4, 4), bool)
    records, kept = judge(["cat", "dog", "apple"], [full, empty, full], [0.9, 0.99, 0.5], {"cat": "seen", "dog": "seen"}, min_score=0.8)
    assert [r.decision for r in records] == [KEPT, EMPTY_MASK, LOW_SCORE]
    assert [r.mask_index for r in records] == [0, None, None]
    assert [r.score for r in records] == [0.9, 0.99, 0.5] and [r.mask_pixels for r in records] == [16, 0, 16]
    assert [r.subset for r in records] == ["seen", "seen", "unknown"]
    assert kept.shape == (1, 4, 4) and kept.dtype == np.uint8 and kept.all()


def test_filter_with_nothing_kept_gives_an_empty_mask_stack():
    records, kept = judge(["cat"], [np.zeros((3, 5), bool)], [1.0], {}, min_score=0.0)
    assert records[0].decision == EMPTY_MASK and kept.shape == (0, 3, 5)


def test_shard_counts_add_up_per_class_and_decision():
    total: dict = {}
    add_counts(total, {"written": 2, "dropped_samples": 1, "per_class": {"cat": {KEPT: 2}, "dog": {LOW_SCORE: 1}}})
    add_counts(total, {"written": 3, "per_class": {"cat": {EMPTY_MASK: 1}}})
    assert total == {"written": 5, "dropped_samples": 1, "per_class": {"cat": {KEPT: 2, EMPTY_MASK: 1}, "dog": {LOW_SCORE: 1}}}


def test_filter_never_keeps_a_class_outside_the_targets():
    full = np.ones((4, 4), bool)
    records, kept = judge(["dog", "cat"], [full, full], [0.99, 0.95], {}, min_score=0.8, targets=["cat"])
    assert [r.decision for r in records] == [NOT_TARGET, KEPT]
    assert [r.mask_index for r in records] == [None, 0] and kept.shape == (1, 4, 4)
