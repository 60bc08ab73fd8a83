"""IoU bookkeeping checked against scikit-learn and a hand-worked example."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from iosd.evaluate.metrics import IoUAccumulator, harmonic_mean


def _random_images(rng, n: int, size: int = 12) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = [str(c) for c in rng.choice(["cat", "dog", "bus", "cow"], size=n)]
    target = rng.random((n, size, size)) < rng.uniform(0.1, 0.6, size=(n, 1, 1))
    noise = rng.random((n, size, size)) < 0.2
    pred = target ^ noise  # correlated but imperfect predictions
    return names, pred, target


def test_hand_worked_example():
    acc = IoUAccumulator()
    # cat, image 1: pred covers 4 px, target 2 px, overlap 2 -> I=2, U=4, IoU 0.5
    p1 = np.zeros((4, 4), bool)
    p1[0, :4] = True
    t1 = np.zeros((4, 4), bool)
    t1[0, :2] = True
    # cat, image 2: pred 1 px, target 3 px, overlap 1 -> I=1, U=3, IoU 1/3
    p2 = np.zeros((4, 4), bool)
    p2[3, 3] = True
    t2 = np.zeros((4, 4), bool)
    t2[3, 1:4] = True
    # dog: disjoint -> I=0, U=2
    p3 = np.eye(4, dtype=bool) & (np.arange(4) == 0)
    t3 = np.zeros((4, 4), bool)
    t3[2, 2] = True
    acc.update("cat", p1, t1)
    acc.update("cat", p2, t2)
    acc.update("dog", p3, t3)
    assert acc.iou("cat") == pytest.approx(3 / 7)
    assert acc.iou("dog") == 0.0
    assert acc.counts() == {"cat": 2, "dog": 1}
    assert acc.miou(["cat", "dog"]) == pytest.approx((3 / 7 + 0) / 2)
    assert acc.pooled_iou(["cat"]) == pytest.approx((0.5 + 1 / 3) / 2)
    assert acc.pooled_iou(["cat", "dog"]) == pytest.approx((0.5 + 1 / 3 + 0) / 3)
    s = acc.summary(seen=["cat"], unseen=["dog"])
    assert s["harmonic_miou"] == 0.0  # unseen 0 -> harmonic 0
    assert s["per_class"]["cat"] == {
        "subset": "seen",
        "iou": pytest.approx(3 / 7),
        "image_iou_mean": pytest.approx(5 / 12),
        "images": 2,
        "empty_union_images": 0,
        "intersection": 3,
        "union": 7,
    }


def test_against_scikit_learn_on_random_masks():
    rng = np.random.default_rng(0)
    names, pred, target = _random_images(rng, 40)
    acc = IoUAccumulator()
    for name, p, t in zip(names, pred, target, strict=True):
        acc.update(name, p, t)
    per_class = {}
    for c in sorted(set(names)):
        idx = [i for i, n in enumerate(names) if n == c]
        expected = jaccard_score(target[idx].ravel(), pred[idx].ravel())
        per_class[c] = expected
        assert acc.iou(c) == pytest.approx(expected, abs=1e-12)
    seen, unseen = ["cat", "dog"], ["bus", "cow"]
    assert acc.miou(seen) == pytest.approx(np.mean([per_class[c] for c in seen]))
    images = [jaccard_score(target[i].ravel(), pred[i].ravel()) for i in range(len(names)) if names[i] in unseen]
    assert acc.pooled_iou(unseen) == pytest.approx(np.mean(images))
    s = acc.summary(seen, unseen)
    m_s, m_u = s["seen"]["miou"], s["unseen"]["miou"]
    assert s["harmonic_miou"] == pytest.approx(2 * m_s * m_u / (m_s + m_u))
    assert s["seen"]["images"] == sum(n in seen for n in names)
    json.dumps(s)  # JSON-able


def test_batched_numpy_and_torch_agree_with_single_updates():
    rng = np.random.default_rng(1)
    names, pred, target = _random_images(rng, 16)
    single, batched, tensors = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    for name, p, t in zip(names, pred, target, strict=True):
        single.update(name, p, t)
    batched.update_batch(names, pred, target)
    tensors.update_batch(names, torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
    assert single.summary(["cat", "dog"], ["bus", "cow"]) == batched.summary(["cat", "dog"], ["bus", "cow"])
    assert single.summary(["cat", "dog"], ["bus", "cow"]) == tensors.summary(["cat", "dog"], ["bus", "cow"])


def test_merge_equals_one_accumulator():
    rng = np.random.default_rng(2)
    names, pred, target = _random_images(rng, 20)
    whole, a, b = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    whole.update_batch(names, pred, target)
    a.update_batch(names[:7], pred[:7], target[:7])
    b.update_batch(names[7:], pred[7:], target[7:])
    a.merge(b)
    assert a.counts() == whole.counts()
    for name, t in whole.tallies.items():
        m = a.tallies[name]
        assert (m.images, m.intersection, m.union, m.empty_union_images) == (t.images, t.intersection, t.union, t.empty_union_images)
        assert m.image_iou_sum == pytest.approx(t.image_iou_sum, abs=1e-12)  # float sums, another order


def test_empty_unions_and_missing_classes():
    acc = IoUAccumulator()
    empty = np.zeros((3, 3), bool)
    full = np.ones((3, 3), bool)
    acc.update("cat", empty, empty)  # both empty: no IoU, skipped by the pooled mean
    acc.update("cat", full, full)  # perfect
    acc.update("dog", empty, empty)  # only empty images: class IoU undefined
    assert acc.iou("cat") == 1.0
    assert acc.pooled_iou(["cat"]) == 1.0
    assert math.isnan(acc.iou("dog")) and math.isnan(acc.iou("bird"))
    assert math.isnan(acc.pooled_iou(["dog"]))
    assert acc.miou(["cat", "dog", "bird"]) == 1.0  # undefined classes are left out...
    s = acc.summary(seen=["cat", "dog"], unseen=["bird"])
    assert s["seen"]["missing"] == ["dog"] and s["seen"]["classes"] == 1  # ...and named
    assert s["per_class"]["dog"]["iou"] is None and s["per_class"]["dog"]["empty_union_images"] == 1
    assert s["per_class"]["bird"]["images"] == 0
    assert s["unseen"]["miou"] is None and s["harmonic_miou"] is None
    json.dumps(s, allow_nan=False)
    # a missed object is IoU 0, not an empty union
    acc.update("cow", empty, full)
    assert acc.iou("cow") == 0.0 and acc.pooled_iou(["cow"]) == 0.0


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.5) == 0.5
    assert harmonic_mean(0.9, 0.3) == pytest.approx(0.45)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 0.4))


def test_bad_masks_are_refused():
    acc = IoUAccumulator()
    with pytest.raises(ValueError, match="threshold"):
        acc.update("cat", np.full((2, 2), 0.7), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="threshold"):
        acc.update("cat", torch.rand(2, 2), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        acc.update("cat", np.full((2, 2), 3), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="equal"):
        acc.update("cat", np.ones((2, 2), bool), np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="class names"):
        acc.update_batch(["cat"], np.ones((2, 2, 2), bool), np.ones((2, 2, 2), bool))
    assert acc.counts() == {}
