"""Protocol II's parts: the exact-mask semantic writer against MMSeg's reader, and the MMSeg
segmenter learning from such a set (scored on held-out exact-mask images)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from iosd.errors import UserError
from iosd.evaluate.exact_set import write_exact_set
from iosd.evaluate.segmenter import SegmenterConfig, score_segmenter, train_segmenter
from iosd.export_layout import IGNORE_ID, SEMANTIC_CLASSES, SEMANTIC_IMAGES, SEMANTIC_LABELS
from iosd.pipeline.export import write_semantic_classes

CLASSES = ["star", "heart", "hexagon"]


def test_exact_set_reads_back_with_mmseg_dataset(tmp_path):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations

    root = tmp_path / "exact"
    assert write_exact_set(root, CLASSES, 2, size=64, objects=2, seed=3) == 6
    meta = json.loads((root / SEMANTIC_CLASSES).read_text())
    assert meta["classes"] == ["background", *CLASSES] and len(meta["palette"]) == 4
    dataset = BaseSegDataset(
        data_root=str(root),
        data_prefix=dict(img_path=SEMANTIC_IMAGES.format(split="train"), seg_map_path=SEMANTIC_LABELS.format(split="train")),
        img_suffix=".png",
        seg_map_suffix=".png",
        metainfo={"classes": meta["classes"], "palette": meta["palette"]},
        pipeline=[LoadImageFromFile(), LoadAnnotations()],
    )
    assert len(dataset) == 6
    assert list(dataset.metainfo["classes"]) == meta["classes"]
    for index in range(len(dataset)):
        sample = dataset[index]
        label = sample["gt_seg_map"]
        assert sample["img"].shape == (64, 64, 3) and label.shape == (64, 64)
        present = set(np.unique(label).tolist())
        assert present <= {0, 1, 2, 3} and IGNORE_ID not in present
        assert index % len(CLASSES) + 1 in present  # scene i holds class i (cycled), and another
        assert len(present - {0}) == 2
    # a rerun resumes (nothing to write) and keeps the same pixels; other classes are refused
    before = (root / SEMANTIC_LABELS.format(split="train") / "000004.png").read_bytes()
    assert write_exact_set(root, CLASSES, 2, size=64, objects=2, seed=3) == 0
    assert (root / SEMANTIC_LABELS.format(split="train") / "000004.png").read_bytes() == before
    with pytest.raises(UserError, match="other classes"):
        write_exact_set(root, ["disc"], 2, size=64)


def test_segmenter_learns_exact_masks_and_scores_held_out_images(tmp_path):
    """SegFormer (MiT at CPU widths) from scratch: held-out foreground mIoU well above chance."""
    write_exact_set(tmp_path / "train", CLASSES, 8, size=64, seed=0)
    write_exact_set(tmp_path / "test", CLASSES, 4, size=64, seed=0, split="val")
    started = time.perf_counter()
    trained = train_segmenter(tmp_path / "train", SegmenterConfig(steps=40, batch_size=8, seed=0))
    scores = score_segmenter(trained, tmp_path / "test", split="val", keep=2)
    seconds = time.perf_counter() - started
    assert trained.classes == ["background", *CLASSES]
    assert scores["images"] == 12 and len(scores["examples"]) == 2
    assert set(scores["per_class_iou"]) == {"background", *CLASSES}
    # an untrained or all-background segmenter scores ~0 on the foreground classes
    assert scores["miou"] > 0.4, (scores["per_class_iou"], seconds)

    # the same test set exported with its classes in another order scores the same
    permuted = tmp_path / "permuted"
    shutil.copytree(tmp_path / "test", permuted)
    order = [CLASSES[2], CLASSES[0], CLASSES[1]]
    write_semantic_classes(permuted, order)
    new_id = np.arange(256, dtype=np.uint8)
    for old, name in enumerate(CLASSES, start=1):
        new_id[old] = order.index(name) + 1
    for path in (permuted / SEMANTIC_LABELS.format(split="val")).glob("*.png"):
        Image.fromarray(new_id[np.asarray(Image.open(path))]).save(path)
    again = score_segmenter(trained, permuted, split="val")
    assert again["per_class_iou"] == pytest.approx(scores["per_class_iou"])


def test_exact_set_paints_as_a_trained_world_when_asked(tmp_path):
    """A trained world's head labels objects of any hue, so its Protocol II exact sets draw
    random hues (and the world's style): the same class then comes in several colours, where
    the class palette gives it one; an unknown palette is refused before anything is written."""
    from iosd.export_layout import SEMANTIC_IMAGES as IMAGES

    def hue_spread(root, name_id):
        """The widest circular distance between the hues of the class's objects."""
        import colorsys

        hues = []
        for label_path in sorted((root / SEMANTIC_LABELS.format(split="train")).glob("*.png")):
            label = np.asarray(Image.open(label_path))
            image = np.asarray(Image.open(root / IMAGES.format(split="train") / label_path.name).convert("RGB"))
            r, g, b = np.median(image[label == name_id], axis=0) / 255
            hues.append(colorsys.rgb_to_hsv(r, g, b)[0])
        return max(min(abs(a - b), 1 - abs(a - b)) for a in hues for b in hues)

    write_exact_set(tmp_path / "class", ["star"], 6, size=64, seed=1, style="plain")
    write_exact_set(tmp_path / "random", ["star"], 6, size=64, seed=1, palette="random", style="plain")
    assert hue_spread(tmp_path / "class", 1) < 0.05 and hue_spread(tmp_path / "random", 1) > 0.2
    with pytest.raises(UserError, match="unknown palette"):
        write_exact_set(tmp_path / "bad", CLASSES, 1, size=64, palette="rainbow")
    assert not (tmp_path / "bad").exists()
