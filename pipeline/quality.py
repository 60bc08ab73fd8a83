"""Quality control of the head's masks in a synthesized dataset: one decision per (image, class).

A generated dataset is only as good as the masks it keeps, and there is no ground truth to
check them against. What can be measured is recorded for every mask, so a user can see why
something was dropped and filter harder later:

- ``confidence``: the head's mean probability inside its mask (0 for an empty mask);
- ``area``: the mask's fraction of the image (bounds catch masks that are specks or everything);
- ``agreement``: IoU of the head's mask with the teacher's, for classes the teacher knows
  (exact masks in the shapes world; None when there is no teacher mask to compare with).

Checks run in this order and the first failure names the decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from iosd.errors import UserError
from iosd.evaluate.metrics import mask_iou
from iosd.schema import EMPTY_MASK, KEPT

TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
LOW_CONFIDENCE = "low_confidence"
LOW_AGREEMENT = "low_agreement"
QC_DECISIONS = (KEPT, EMPTY_MASK, TOO_SMALL, TOO_LARGE, LOW_CONFIDENCE, LOW_AGREEMENT)
DIGITS = 6  # measurements are recorded (and judged) to this many decimals


@dataclass(frozen=True)
class Limits:
    """What a mask must meet to be kept; ``min_agreement`` None means agreement never drops."""

    min_confidence: float = 0.0
    min_agreement: float | None = None
    min_area: float = 0.0
    max_area: float = 1.0

    def check(self) -> Limits:
        for flag, value in (("--min-confidence", self.min_confidence), ("--min-agreement", self.min_agreement), ("--min-area", self.min_area), ("--max-area", self.max_area)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} {value} is outside 0..1", f"pass {flag} between 0 and 1")
        if self.min_area > self.max_area:
            raise UserError(f"--min-area {self.min_area} is above --max-area {self.max_area}", "pass bounds with min <= max")
        return self

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The measurements of one mask and what was decided."""

    name: str
    confidence: float
    area: float
    agreement: float | None
    decision: str

    @property
    def kept(self) -> bool:
        return self.decision == KEPT

    def to_json(self) -> dict:
        return asdict(self)


def judge_mask(name: str, prob: np.ndarray, mask: np.ndarray, teacher: np.ndarray | None, limits: Limits) -> Verdict:
    """Measure one head mask (``prob`` its (H, W) probabilities, ``mask`` the thresholded mask)
    against ``limits``; ``teacher`` is the teacher's mask when the teacher knows the class."""
    mask = np.asarray(mask, bool)
    pixels = int(mask.sum())
    # rounded as recorded, then judged: a limit taken from a record decides as it reads
    confidence = round(float(prob[mask].mean()), DIGITS) if pixels else 0.0
    area = round(pixels / mask.size, DIGITS)
    agreement = None
    if teacher is not None:
        iou = mask_iou(mask, np.asarray(teacher, bool))
        agreement = 1.0 if iou is None else round(float(iou), DIGITS)  # both empty: they agree
    if pixels == 0:
        decision = EMPTY_MASK
    elif area < limits.min_area:
        decision = TOO_SMALL
    elif area > limits.max_area:
        decision = TOO_LARGE
    elif confidence < limits.min_confidence:
        decision = LOW_CONFIDENCE
    elif limits.min_agreement is not None and agreement is not None and agreement < limits.min_agreement:
        decision = LOW_AGREEMENT
    else:
        decision = KEPT
    return Verdict(name, confidence, area, agreement, decision)


def summarise(images: list[dict]) -> dict:
    """Counts over per-image records (``classes``: Verdict dicts, ``kept``: bool): images kept and
    dropped, decisions overall and per class, and each class's mean confidence of kept masks."""
    decisions = dict.fromkeys(QC_DECISIONS, 0)
    per_class: dict[str, dict] = {}
    kept_conf: dict[str, list[float]] = {}
    for image in images:
        for v in image["classes"]:
            decisions[v["decision"]] += 1
            entry = per_class.setdefault(v["name"], dict.fromkeys(QC_DECISIONS, 0))
            entry[v["decision"]] += 1
            if v["decision"] == KEPT:
                kept_conf.setdefault(v["name"], []).append(v["confidence"])
    for name, entry in per_class.items():
        confs = kept_conf.get(name)
        entry["mean_confidence_kept"] = round(float(np.mean(confs)), 6) if confs else None
    kept = sum(1 for image in images if image["kept"])
    return {"images": len(images), "images_kept": kept, "images_dropped": len(images) - kept, "masks": decisions, "per_class": per_class}
