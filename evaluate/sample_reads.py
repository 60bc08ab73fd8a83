"""How recognisable a generator's samples are: what a trained teacher reads in each one.

Why: "the world draws recognisable shapes" must be a number a retrained world can be held to,
not an opinion about a preview grid. The trained world teacher (mask AP 61.9 on exact-mask
scenes) reads every one-object sample; a sample is *recognised* when the teacher's
highest-scoring instance has the prompted class. The same reading of the world's own rendered
scenes is the ceiling, so the score comes as a ratio measured in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from iosd.errors import UserError

FILTER_SCORE = 0.8  # IOSD's confidence filter: how many samples would pass it


def teacher_reads(predictions: Sequence[dict], names: Sequence[str], prompted: Sequence[str]) -> list[dict]:
    """Per sample: the class of the teacher's top instance (None when it keeps none), that
    instance's score, and the best score of an instance of the prompted class (0 when none).
    ``predictions`` are ``evaluate.teacher_ap.predict_instances``'s (label indices into ``names``)."""
    if len(predictions) != len(prompted):
        raise UserError(f"{len(predictions)} predictions but {len(prompted)} prompted classes", "read one prediction list per sample")
    unknown = sorted(set(prompted) - set(names))
    if unknown:
        raise UserError(f"the teacher does not label {', '.join(map(repr, unknown))}", f"prompt classes it knows: {', '.join(names)}")
    reads = []
    for pred, name in zip(predictions, prompted, strict=True):
        scores, labels = np.asarray(pred["scores"], float), np.asarray(pred["labels"], int)
        top = int(np.argmax(scores)) if len(scores) else None
        own = scores[labels == list(names).index(name)]
        reads.append({"prompted": name, "read": None if top is None else names[labels[top]], "top_score": 0.0 if top is None else round(float(scores[top]), 4),
                      "prompted_score": round(float(own.max()), 4) if len(own) else 0.0})
    return reads


def summarise_reads(reads: Sequence[dict]) -> dict:
    """Recognised fraction (overall and per class), the prompted class's median score, the top
    instance's median score whatever its class (does the sample look like *some* shape?), and
    the fraction IOSD's 0.8 filter would keep."""
    if not reads:
        raise UserError("no samples to read", "generate at least one sample per class")
    per_class: dict[str, list[bool]] = {}
    for r in reads:
        per_class.setdefault(r["prompted"], []).append(r["read"] == r["prompted"])
    own = np.array([r["prompted_score"] for r in reads])
    return {
        "samples": len(reads),
        "recognised": round(float(np.mean([r["read"] == r["prompted"] for r in reads])), 4),
        "prompted_class_found": round(float(np.mean(own > 0)), 4),
        "median_prompted_score": round(float(np.median(own)), 4),
        "median_top_score": round(float(np.median([r["top_score"] for r in reads])), 4),
        f"at_{FILTER_SCORE}": round(float(np.mean(own >= FILTER_SCORE)), 4),
        "recognised_per_class": {k: round(float(np.mean(v)), 3) for k, v in per_class.items()},
    }


def rendered_one_object(names: Sequence[str], per_class: int, seed: int, side: int, style: str = "textured") -> list[tuple[np.ndarray, str]]:
    """``per_class`` of the world's own one-object scenes per class (random hues, its ``style``),
    as its training scenes are drawn: what the teacher reads in them is the ceiling for samples."""
    from iosd.pipeline.shapes import render_scene
    from iosd.worlds import random_hues

    out = []
    for k, name in enumerate(names):
        for i in range(per_class):
            rng = np.random.default_rng([seed, 17, k, i])
            hue, = random_hues(rng, 1)
            image, _ = render_scene([name], rng, side, [hue], style)
            out.append((image, name))
    return out
