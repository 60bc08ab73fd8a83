"""Mask AP of a Mask R-CNN teacher on held-out shapes-world scenes with exact masks.

Why: the trained world teacher is meant to make real mistakes, and how many it makes is the
number the 0.8 filter is judged against. Scenes come from the evaluation stream of
train/world_teacher.py (never a training draw); the teacher runs exactly as the generate stage
runs it (its own test pipeline on the 64 px RGB image, masks at the image's size), keeping
every instance above its score threshold; pycocotools' COCOeval (segm) scores them.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch

from iosd.errors import UserError


def predict_instances(teacher, images: Sequence[np.ndarray], batch: int = 16) -> list[dict]:
    """Per image: every instance the teacher's detector keeps (masks (N, H, W) bool, labels,
    scores), through the same pipeline as ``MaskRCNNTeacher.label``."""
    from mmengine.dataset import pseudo_collate

    from iosd.pipeline.teacher import _quiet, _to_bgr

    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        data = pseudo_collate([teacher.pipeline({"img": _to_bgr(img), "img_id": start + i}) for i, img in enumerate(chunk)])
        with torch.no_grad(), _quiet():
            results = teacher.model.test_step(data)
        for res in results:
            inst = res.pred_instances
            keep = inst.scores > teacher.score_thr
            out.append({"masks": inst.masks[keep].bool().cpu().numpy(), "labels": inst.labels[keep].cpu().numpy(), "scores": inst.scores[keep].cpu().numpy()})
    return out


def coco_mask_ap(scenes: Sequence[tuple[np.ndarray, np.ndarray, list[str]]], predictions: Sequence[dict], names: Sequence[str]) -> dict:
    """COCOeval (segm) of ``predictions`` (label indices into ``names``) against the scenes'
    exact masks: AP, AP50, AP75 and per-class AP (None for a class with no ground truth)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from iosd.pipeline.export import rle_of, rle_stats

    if len(scenes) != len(predictions) or not scenes:
        raise UserError(f"{len(scenes)} scenes but {len(predictions)} predictions", "score at least one scene, one prediction list per scene")
    images, annotations, results = [], [], []
    for i, ((image, masks, scene_names), pred) in enumerate(zip(scenes, predictions, strict=True)):
        h, w = image.shape[:2]
        images.append({"id": i, "height": h, "width": w})
        for mask, name in zip(masks, scene_names, strict=True):
            rle = rle_of(mask)
            area, box = rle_stats(rle)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": list(names).index(name) + 1, "segmentation": rle, "area": area, "bbox": box, "iscrowd": 0})
        for mask, label, score in zip(pred["masks"], pred["labels"], pred["scores"], strict=True):
            results.append({"image_id": i, "category_id": int(label) + 1, "segmentation": rle_of(mask), "score": float(score)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class_AP": dict.fromkeys(names, 0.0), "scenes": len(scenes), "instances": len(annotations), "detections": 0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # [IoU thresholds, recall, class, area range, max dets]
    per_class = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        per_class[name] = round(float(p[p > -1].mean()), 4) if (p > -1).any() else None
    return {"AP": round(float(ev.stats[0]), 4), "AP50": round(float(ev.stats[1]), 4), "AP75": round(float(ev.stats[2]), 4), "per_class_AP": per_class,
            "scenes": len(scenes), "instances": len(annotations), "detections": len(results)}


def evaluate_teacher(teacher, seed: int, count: int) -> dict:
    """The teacher's mask AP on ``count`` held-out scenes of the evaluation stream of ``seed``."""
    from iosd.train.world_teacher import held_out_scenes, teacher_classes

    unknown = [n for n in teacher.names if n not in teacher_classes()]
    if unknown:
        raise UserError(f"the teacher labels {', '.join(map(repr, unknown[:3]))}, not shapes-world classes", "pass a teacher trained on the shapes world (scripts/train-teacher.py)")
    scenes = held_out_scenes(seed, count, list(teacher.names))
    predictions = predict_instances(teacher, [s[0] for s in scenes])
    return {**coco_mask_ap(scenes, predictions, teacher.names), "seed": seed, "score_thr": teacher.score_thr}
