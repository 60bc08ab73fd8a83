"""The mask filter: GD's "training without zero masks" and IOSD's confidence threshold.

Every decision and score is recorded so training can filter harder later without
regenerating.
"""

from __future__ import annotations

import numpy as np

from iosd.schema import EMPTY_MASK, KEPT, LOW_SCORE, NOT_TARGET, ClassRecord


def judge(names: list[str], masks: list[np.ndarray], scores: list[float], subsets: dict[str, str], min_score: float,
          targets: list[str] | None = None) -> tuple[list[ClassRecord], np.ndarray]:
    """Class records with decisions, and the (K, H, W) uint8 masks of the kept classes.

    A class outside ``targets`` (default: every class) is recorded but never kept.
    """
    records, kept = [], []
    for name, mask, score in zip(names, masks, scores, strict=True):
        pixels = int(mask.sum())
        if targets is not None and name not in targets:
            decision = NOT_TARGET
        elif pixels == 0:
            decision = EMPTY_MASK
        elif score < min_score:
            decision = LOW_SCORE
        else:
            decision = KEPT
        index = len(kept) if decision == KEPT else None
        if decision == KEPT:
            kept.append(mask.astype(np.uint8))
        records.append(ClassRecord(name, subsets.get(name, "unknown"), round(float(score), 6), pixels, decision, index))
    h, w = masks[0].shape if masks else (0, 0)
    return records, (np.stack(kept) if kept else np.zeros((0, h, w), np.uint8))
