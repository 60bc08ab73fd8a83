"""Score a head (and DAAM) on cached test shards: batched, no diffusion, decode in workers.

Two-object test shards also score each prompt group (seen+seen, seen+unseen,
unseen+unseen) on its own: a class's IoU within a group comes from that group's images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from iosd.evaluate.metrics import IoUAccumulator, mask_iou
from iosd.evaluate.report import Example
from iosd.pipeline.daam import daam_masks
from iosd.schema import KEPT, PAIR_GROUPS, iter_tar_samples


class _TestSamples(IterableDataset):
    """Samples of the test shards, each worker reading its own shards."""

    def __init__(self, paths: list[str], layers: list[str]) -> None:
        self.paths, self.layers = paths, layers

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.paths if info is None else self.paths[info.id :: info.num_workers]
        for path in mine:
            for s in iter_tar_samples(path, features=self.layers):
                yield {
                    "key": s.key,
                    "image": s.image,
                    "features": {p: torch.from_numpy(s.features[p]) for p in self.layers},
                    "queries": torch.from_numpy(s.embeddings),
                    "names": [c.name for c in s.classes],
                    "gt": [s.masks[c.mask_index] if c.decision == KEPT and c.mask_index is not None else None for c in s.classes],
                    "scores": [c.score for c in s.classes],
                    "daam": s.daam,
                    "group": s.extra.get("group"),
                }


def _collate(items: list[dict]) -> list[dict]:
    return items


def shard_batches(shard_dir: Path, shard_names: list[str], layers: list[str], batch_size: int = 16, workers: int = 2) -> DataLoader:
    """Batches (lists of decoded samples) of the test shards, decoded in ``workers`` processes."""
    from iosd.store import join

    paths = [join(shard_dir, n) for n in shard_names]  # a directory or an object-store URL
    return DataLoader(_TestSamples(paths, layers), batch_size=batch_size, collate_fn=_collate, num_workers=min(workers, len(paths)))


def head_inputs(batch: list[dict], layers: list[str], device: str) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(features, queries, valid) of a batch: queries padded to its longest prompt."""
    q = max(len(item["names"]) for item in batch)
    feats = {p: torch.stack([item["features"][p] for item in batch]).to(device) for p in layers}
    queries = torch.zeros(len(batch), q, batch[0]["queries"].shape[-1])
    valid = torch.zeros(len(batch), q, dtype=torch.bool)
    for b, item in enumerate(batch):
        queries[b, : len(item["names"])] = item["queries"]
        valid[b, : len(item["names"])] = True
    return feats, queries.to(device), valid.to(device)


def _methods() -> dict[str, IoUAccumulator]:
    return {"head": IoUAccumulator(), "daam": IoUAccumulator()}


@dataclass
class Scores:
    methods: dict[str, IoUAccumulator] = field(default_factory=_methods)
    images: dict[str, int] = field(default_factory=dict)  # per class, all test images
    filtered: dict[str, int] = field(default_factory=dict)  # per class, no trusted teacher mask
    examples: dict[str, list[Example]] = field(default_factory=dict)
    groups: dict[str, dict[str, IoUAccumulator]] = field(default_factory=dict)  # group -> method -> IoUs
    group_images: dict[str, int] = field(default_factory=dict)  # per group, all test images

    def group_results(self, seen: Sequence[str], unseen: Sequence[str]) -> dict[str, dict[str, dict]]:
        """{group: {method: summary}} in GD's order; a group only counts the subsets it draws from."""
        out = {}
        for group in [g for g in PAIR_GROUPS if g in self.groups] + sorted(set(self.groups) - set(PAIR_GROUPS)):
            subsets = set(group.split("+"))
            mine = (list(seen) if "seen" in subsets else [], list(unseen) if "unseen" in subsets else [])
            out[group] = {m: acc.summary(*mine) for m, acc in self.groups[group].items()}
        return out


@torch.no_grad()
def score(head: torch.nn.Module, shard_dir: Path, shard_names: list[str], layers: list[str], *, gt_min_score: float, threshold: float = 0.5, batch_size: int = 16,
          device: str = "cpu", workers: int = 2, examples_per_class: int = 3, progress=None, baselines: Mapping[str, Any] | None = None, with_daam: bool = True) -> Scores:
    """Per-class IoU of the head's masks, DAAM's and each baseline's, against the teacher's
    confident masks. ``baselines``: name -> a teacher (pipeline/teachers) applied straight to
    the test images, the text-prompted segmenter a user would pick instead of training a head."""
    logit_thr = math.log(threshold / (1 - threshold))
    out = Scores()
    for m in baselines or {}:
        out.methods.setdefault(m, IoUAccumulator())
    for batch in shard_batches(shard_dir, shard_names, layers, batch_size, workers):
        logits = head(*head_inputs(batch, layers, device)).float()
        direct = {m: t.label([item["image"] for item in batch], [item["names"] for item in batch]) for m, t in (baselines or {}).items()}
        size = batch[0]["image"].shape[0]
        preds = (F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False) > logit_thr).cpu().numpy()
        for b, item in enumerate(batch):
            daam = daam_masks(item["daam"], size) if item["daam"] is not None else None
            group = item["group"]
            if group:
                out.group_images[group] = out.group_images.get(group, 0) + 1
            tallies = [out.methods, out.groups.setdefault(group, _methods())] if group else [out.methods]
            for i, name in enumerate(item["names"]):
                out.images[name] = out.images.get(name, 0) + 1
                gt = item["gt"][i]
                if gt is None or item["scores"][i] < gt_min_score:
                    out.filtered[name] = out.filtered.get(name, 0) + 1
                    continue
                target = gt.astype(bool)
                for methods in tallies:
                    methods["head"].update(name, preds[b, i], target)
                    if daam is not None:
                        methods["daam"].update(name, daam[i], target)
                    for m, labels in direct.items():
                        methods.setdefault(m, IoUAccumulator()).update(name, labels[b][i].mask, target)
                shown = out.examples.setdefault(name, [])
                if len(shown) < examples_per_class:
                    masks = {"teacher": target, "head": preds[b, i]}
                    if daam is not None:
                        masks["daam"] = daam[i]
                    masks.update({m: labels[b][i].mask for m, labels in direct.items()})
                    ious = {col: iou for col, m in masks.items() if col != "teacher" and (iou := mask_iou(m, target)) is not None}
                    shown.append(Example(image=item["image"], masks=masks, ious=ious, caption=name))
        if progress is not None:
            progress(len(batch))
    if not with_daam or not any(out.methods["daam"].counts().values()):
        for methods in [out.methods, *out.groups.values()]:
            methods.pop("daam")
    return out
