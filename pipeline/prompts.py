"""Prompts for generation: one or two objects, GD's templates or IOSD's negative-class form.

A prompt comes with the class names it shows and the ones that are *targets*: every shown
class, except under ``negative`` (IOSD's DSFP row), where the second class is there only to
be told apart and the query is the one class supervised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iosd.errors import UserError

GD_TEMPLATE = "a photograph of a {}"
GD_TEMPLATE_2 = "a photograph of a {} and a {}"
OBJECTS = ("1", "2", "mix")


@dataclass(frozen=True)
class PromptSpec:
    """How prompts are built; recorded in the manifest."""

    objects: str = "1"
    template: str = GD_TEMPLATE
    template2: str = GD_TEMPLATE_2
    negative: bool = False

    def check(self) -> PromptSpec:
        if self.objects not in OBJECTS:
            raise UserError(f"--objects {self.objects!r} is not one of {', '.join(OBJECTS)}", "pass --objects 1, 2 or mix")
        if self.template.count("{}") != 1:
            raise UserError(f"--template {self.template!r} needs exactly one {{}}", 'e.g. --template "a photograph of a {}"')
        if self.template2.count("{}") != 2:
            raise UserError(f"two-object template {self.template2!r} needs two {{}}", 'e.g. "a photograph of a {} and a {}"')
        return self


def make_prompt(rng: np.random.Generator, classes: tuple[str, ...], spec: PromptSpec, query: str | None = None,
                pair: tuple[str, str] | None = None) -> tuple[str, list[str], list[str]]:
    """A prompt, the class names it shows, and those of them that are targets.

    ``query`` fixes the first class (evaluation plans); otherwise it is drawn from ``classes``.
    ``pair`` fixes both classes of a two-object prompt, in order (two-object evaluation plans);
    it draws nothing from ``rng``, so the plan alone decides the prompt.
    With ``negative``, the two-object template holds the query and a random other class in
    random order, and only the query is a target (IOSD's official code).
    """
    if pair is not None:
        names = list(pair)
        return spec.template2.format(*names), names, names
    first = query if query is not None else classes[rng.integers(len(classes))]
    others = [c for c in classes if c != first]
    if spec.negative:
        if not others:
            raise UserError("the negative-class prompt needs at least two classes", "drop --negative or add classes")
        other = others[rng.integers(len(others))]
        order = [first, other] if rng.random() < 0.5 else [other, first]
        return spec.template2.format(*order), order, [first]
    two = spec.objects == "2" or (spec.objects == "mix" and rng.random() < 0.5)
    if two and others:
        other = others[rng.integers(len(others))]
        return spec.template2.format(first, other), [first, other], [first, other]
    return spec.template.format(first), [first], [first]
