"""Validation: mean IoU by class on held-out shards, with iosd-eval's accumulator, over every rank.

Predictions are ``sigmoid(logits) > 0.5`` after upsampling the logits to the mask's size;
a class's IoU is its summed intersection over its summed union (GD's category-wise mIoU,
``iosd.evaluate.metrics.IoUAccumulator``), and the mIoU averages the classes of a subset.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from iosd.evaluate.metrics import IoUAccumulator


class ValTally:
    """An IoUAccumulator plus which subset each class belongs to; mergeable across ranks."""

    def __init__(self) -> None:
        self.acc = IoUAccumulator()
        self.subsets: dict[str, str] = {}

    def merge(self, other: ValTally) -> None:
        self.acc.merge(other.acc)
        self.subsets.update(other.subsets)

    @property
    def empty(self) -> bool:
        return not self.acc.tallies

    def summary(self) -> dict:
        seen = sorted(n for n, s in self.subsets.items() if s == "seen")
        unseen = sorted(n for n, s in self.subsets.items() if s != "seen")
        report = self.acc.summary(seen, unseen)
        return {
            "val_miou": self.acc.miou(seen + unseen),
            "val_seen_miou": report["seen"]["miou"],
            "val_unseen_miou": report["unseen"]["miou"],
            "val_per_class": {n: (round(c["iou"], 4) if c["iou"] is not None else None) for n, c in report["per_class"].items()},
            "val_masks": sum(self.acc.counts().values()),
        }


def predictions(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean masks: logits upsampled (bilinear) to ``size``, then sigmoid > 0.5."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return logits > 0


@torch.no_grad()
def run_validation(model: torch.nn.Module, batches: Iterable[dict], device: torch.device, autocast) -> ValTally:
    """This rank's tallies over ``batches`` (the model in eval mode during the pass)."""
    tally = ValTally()
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            features = {k: v.to(device, non_blocking=True) for k, v in batch["features"].items()}
            queries = batch["queries"].to(device, non_blocking=True)
            query_mask = batch["query_mask"].to(device, non_blocking=True)
            with autocast():
                logits = model(features, queries, query_mask)
            masks = batch["masks"].to(device)
            valid = query_mask.nonzero().tolist()
            pred = predictions(logits, tuple(masks.shape[-2:]))
            rows = torch.tensor([b for b, _ in valid], device=device), torch.tensor([q for _, q in valid], device=device)
            names = [batch["names"][b][q] for b, q in valid]
            for b, q in valid:
                tally.subsets[batch["names"][b][q]] = batch["subsets"][b][q]
            tally.acc.update_batch(names, pred[rows], masks[rows] > 0)
    finally:
        model.train(was_training)
    return tally
