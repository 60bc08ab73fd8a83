#!/usr/bin/env python
"""How good a teacher's masks are, by its confidence: its shards against the exact-mask shards of
the same scenes (the same --source shapes command with and without --labels teacher).

    python scripts/teacher-vs-exact.py runs/world-compare/shards/head runs/world-compare/shards/teacher

Pairs samples by seed (the same seed renders the same scene), then prints JSON: how many of the
teacher's masks score at or above --score (IOSD's 0.8 filter) and below it, and each group's
mean IoU with the exact mask. Why: the filter is worth what separates those two numbers, against
the masks (and classes) it throws away.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import click

from iosd.errors import UserError, user_errors


def _samples(directory: Path) -> dict:
    from iosd.schema import iter_tar_samples

    tars = sorted(glob.glob(str(directory / "*.tar")))
    if not tars:
        raise UserError(f"{directory} holds no shards", "pass the --out of an iosd-gen run")
    return {s.seed: s for tar in tars for s in iter_tar_samples(tar, features=False)}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("exact", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("teacher", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--score", type=float, default=0.8, help="the confidence filter to split the teacher's masks at")
@user_errors(kept="nothing was written", rerun="then rerun the same command")
def main(exact: Path, teacher: Path, score: float) -> None:
    import numpy as np

    from iosd.evaluate.metrics import mask_iou

    truth, labelled = _samples(exact), _samples(teacher)
    shared = sorted(set(truth) & set(labelled))
    if not shared:
        raise UserError(f"{exact} and {teacher} share no scene (no common seed)", "generate both with the same command, one with --labels teacher")
    groups: dict[str, list[float]] = {"at_or_above": [], "below": []}
    per_class: dict[str, list[int]] = {}
    for seed in shared:
        a, b = truth[seed], labelled[seed]
        if not np.array_equal(a.image, b.image):
            raise UserError(f"seed {seed} renders different images in the two sets", "generate both with the same model, classes and source")
        exact_masks = {r.name: a.masks[r.mask_index].astype(bool) for r in a.classes if r.mask_index is not None}
        for r in b.classes:
            counts = per_class.setdefault(r.name, [0, 0])
            counts[r.score >= score] += 1
            if r.mask_index is None or r.name not in exact_masks:
                continue
            groups["at_or_above" if r.score >= score else "below"].append(mask_iou(b.masks[r.mask_index], exact_masks[r.name]) or 0.0)
    report = {"scenes": len(shared), "score": score}
    for name, ious in groups.items():
        report[f"masks_{name}"] = len(ious)
        report[f"mean_iou_{name}"] = round(float(np.mean(ious)), 4) if ious else None
    report["share_at_or_above_per_class"] = {k: round(v[1] / sum(v), 3) for k, v in sorted(per_class.items())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
