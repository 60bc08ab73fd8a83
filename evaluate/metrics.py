"""IoU bookkeeping for iosd-eval: per-class IoU, seen/unseen mIoU, harmonic mean, pooled mean.

Two protocols, both kept because the papers differ:

- GD (category-wise mIoU): IoU_c = sum of intersections / sum of unions over the images of
  class c; mIoU = mean of IoU_c over the classes of a subset.
- IOSD (pooled): IoU per image, averaged over all images of the subset's classes.

Empty unions: an image where prediction and target are both empty has no IoU. It adds
nothing to a class's sums and is left out of the pooled mean (it is counted, as
``empty_union_images``). A class whose unions sum to zero (or that has no images) has no
IoU: it is reported as None and left out of its subset's mIoU, and named under ``missing``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ClassTally:
    """Running sums for one class."""

    images: int = 0
    intersection: int = 0
    union: int = 0
    image_iou_sum: float = 0.0
    empty_union_images: int = 0

    @property
    def scored_images(self) -> int:
        return self.images - self.empty_union_images

    @property
    def iou(self) -> float:
        return self.intersection / self.union if self.union else math.nan


def _is_torch(x: Any) -> bool:
    return hasattr(x, "detach") and hasattr(x, "dtype") and type(x).__module__.startswith("torch")


def _as_bool(x: Any, what: str):
    """A boolean array/tensor; 0/1 integers are accepted, probabilities are refused."""
    if _is_torch(x):
        import torch

        x = x.detach()
        if x.dtype == torch.bool:
            return x
        if x.is_floating_point() or x.is_complex():
            raise ValueError(f"{what} is a {x.dtype} tensor: threshold it to a boolean mask first")
        if ((x != 0) & (x != 1)).any():
            raise ValueError(f"{what} has values other than 0 and 1")
        return x != 0
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} is a {arr.dtype} array: threshold it to a boolean mask first")
    if ((arr != 0) & (arr != 1)).any():
        raise ValueError(f"{what} has values other than 0 and 1")
    return arr != 0


def _overlaps(pred, target) -> tuple[list[int], list[int]]:
    """Per-image intersection and union pixel counts of (N, H, W) boolean masks."""
    if _is_torch(pred) or _is_torch(target):
        import torch

        pred = pred if _is_torch(pred) else torch.from_numpy(np.ascontiguousarray(pred))
        target = target if _is_torch(target) else torch.from_numpy(np.ascontiguousarray(target)).to(pred.device)
        inter = (pred & target).flatten(1).sum(1)
        union = (pred | target).flatten(1).sum(1)
        return inter.cpu().tolist(), union.cpu().tolist()
    inter = np.logical_and(pred, target).reshape(len(pred), -1).sum(1)
    union = np.logical_or(pred, target).reshape(len(pred), -1).sum(1)
    return inter.tolist(), union.tolist()


def mask_iou(pred, target) -> float | None:
    """IoU of one (H, W) pair of boolean masks; None when both are empty."""
    (inter,), (union,) = _overlaps(_as_bool(pred, "prediction")[None], _as_bool(target, "target")[None])
    return inter / union if union else None


def harmonic_mean(seen: float, unseen: float) -> float:
    """2ab/(a+b): the usual single number for open-vocabulary results (NaN if either is)."""
    if math.isnan(seen) or math.isnan(unseen):
        return math.nan
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class IoUAccumulator:
    """Collects per-class intersection/union sums and per-image IoUs."""

    def __init__(self) -> None:
        self.tallies: dict[str, ClassTally] = {}

    def update(self, class_name: str, pred, target) -> None:
        """One image: ``pred`` and ``target`` are (H, W) boolean masks of ``class_name``."""
        pred, target = _as_bool(pred, "prediction"), _as_bool(target, "target")
        if pred.ndim != 2 or tuple(pred.shape) != tuple(target.shape):
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must be equal (H, W) masks")
        self.update_batch([class_name], pred[None], target[None])

    def update_batch(self, class_names: Sequence[str], preds, targets) -> None:
        """N images at once: ``preds`` and ``targets`` are (N, H, W), one class name per image."""
        preds, targets = _as_bool(preds, "predictions"), _as_bool(targets, "targets")
        if preds.ndim != 3 or tuple(preds.shape) != tuple(targets.shape):
            raise ValueError(f"predictions {tuple(preds.shape)} and targets {tuple(targets.shape)} must be equal (N, H, W) masks")
        if len(class_names) != preds.shape[0]:
            raise ValueError(f"{len(class_names)} class names for {preds.shape[0]} masks")
        for name, inter, union in zip(class_names, *_overlaps(preds, targets), strict=True):
            tally = self.tallies.setdefault(name, ClassTally())
            tally.images += 1
            tally.intersection += int(inter)
            tally.union += int(union)
            if union:
                tally.image_iou_sum += inter / union
            else:
                tally.empty_union_images += 1

    def merge(self, other: IoUAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another worker)."""
        for name, t in other.tallies.items():
            mine = self.tallies.setdefault(name, ClassTally())
            mine.images += t.images
            mine.intersection += t.intersection
            mine.union += t.union
            mine.image_iou_sum += t.image_iou_sum
            mine.empty_union_images += t.empty_union_images

    def iou(self, class_name: str) -> float:
        """Sum of intersections / sum of unions over the class's images (NaN if undefined)."""
        tally = self.tallies.get(class_name)
        return tally.iou if tally is not None else math.nan

    def counts(self) -> dict[str, int]:
        """Images seen per class."""
        return {name: t.images for name, t in sorted(self.tallies.items())}

    def miou(self, classes: Iterable[str]) -> float:
        """Mean class IoU over ``classes`` that have one (NaN if none has)."""
        values = [v for v in (self.iou(c) for c in dict.fromkeys(classes)) if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    def pooled_iou(self, classes: Iterable[str]) -> float:
        """Mean per-image IoU over every scored image of ``classes`` (IOSD's protocol)."""
        tallies = [self.tallies[c] for c in set(classes) if c in self.tallies]
        n = sum(t.scored_images for t in tallies)
        return sum(t.image_iou_sum for t in tallies) / n if n else math.nan

    def _subset(self, classes: Sequence[str]) -> dict:
        missing = [c for c in classes if math.isnan(self.iou(c))]
        return {
            "miou": _json_float(self.miou(classes)),
            "pooled_iou": _json_float(self.pooled_iou(classes)),
            "classes": len(classes) - len(missing),
            "images": sum(self.tallies[c].images for c in classes if c in self.tallies),
            "missing": missing,
        }

    def summary(self, seen: Sequence[str], unseen: Sequence[str]) -> dict:
        """JSON-able results: per class, per subset, and harmonic means (fractions in [0, 1])."""
        seen, unseen = list(seen), list(unseen)
        subset_of = {**{c: "seen" for c in seen}, **{c: "unseen" for c in unseen}}
        per_class = {}
        for name in sorted(set(self.tallies) | set(seen) | set(unseen)):
            t = self.tallies.get(name, ClassTally())
            per_class[name] = {
                "subset": subset_of.get(name),
                "iou": _json_float(t.iou),
                "image_iou_mean": _json_float(t.image_iou_sum / t.scored_images if t.scored_images else math.nan),
                "images": t.images,
                "empty_union_images": t.empty_union_images,
                "intersection": t.intersection,
                "union": t.union,
            }
        return {
            "per_class": per_class,
            "seen": self._subset(seen),
            "unseen": self._subset(unseen),
            "harmonic_miou": _json_float(harmonic_mean(self.miou(seen), self.miou(unseen))),
            "harmonic_pooled_iou": _json_float(harmonic_mean(self.pooled_iou(seen), self.pooled_iou(unseen))),
        }
