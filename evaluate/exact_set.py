"""Exact-mask semantic sets: shapes-world scenes written straight to the ``semantic`` layout.

Protocol II scores a segmenter on images no diffusion model touched; the shapes world draws
them with exact masks, so the scores are against the truth, not a teacher. The same writer
makes the upper-bound training set (the segmenter trained on exact masks). Every scene's
content depends only on (seed, split, index), so a rerun skips what exists and fills in the rest.

Files are written by ``iosd.pipeline.export``'s semantic writer, the one ``iosd-synth`` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iosd.errors import UserError
from iosd.export_layout import (
    BACKGROUND,
    BACKGROUND_ID,
    DEFAULT_SPLIT,
    IMAGE_KEY,
    SEMANTIC_CLASSES,
)
from iosd.pipeline.export import (
    class_ids,
    read_semantic_classes,
    semantic_label_path,
    write_semantic_classes,
    write_semantic_sample,
)
from iosd.pipeline.shapes import render_scene
from iosd.worlds import random_hues

EXACT_TAG = 0x6578616374  # "exact": this writer's own random stream, apart from iosd-gen's
STREAM_OF_SPLIT = {"train": 0, "val": 1, "test": 2}
PALETTES = ("class", "random")  # a hue per class (random tiny models), or random hues (trained worlds)


def semantic_class_list(root: str | Path) -> list[str]:
    """The class list of a semantic export (background first), checked."""
    path = Path(root) / SEMANTIC_CLASSES
    if not path.exists():
        raise UserError(f"{path} is missing", "point at a semantic export (img_dir/, ann_dir/, classes.json)")
    classes = read_semantic_classes(root).get("classes")
    if not isinstance(classes, list) or not classes or classes[0] != BACKGROUND:
        raise UserError(f"{path} does not list {BACKGROUND!r} first", "re-export the dataset")
    return [str(c) for c in classes]


def label_map(masks: np.ndarray, class_ids: list[int]) -> np.ndarray:
    """(H, W) uint8 label map from (N, H, W) visible masks (disjoint) and their class ids."""
    label = np.full(masks.shape[1:], BACKGROUND_ID, np.uint8)
    for mask, class_id in zip(masks, class_ids, strict=True):
        label[mask] = class_id
    return label


def scene_classes(classes: list[str], index: int, objects: int, rng: np.random.Generator) -> list[str]:
    """The names drawn in scene ``index``: its class (cycling through ``classes``) and
    ``objects - 1`` others, in random order, so every class gets the same number of scenes."""
    main = classes[index % len(classes)]
    others = [c for c in classes if c != main]
    extra = list(rng.choice(others, size=min(objects - 1, len(others)), replace=False)) if objects > 1 else []
    names = [main, *map(str, extra)]
    return [names[i] for i in rng.permutation(len(names))]


def write_exact_set(root: str | Path, classes: list[str], images_per_class: int, *, size: int = 128, objects: int = 1, seed: int = 0, split: str = DEFAULT_SPLIT,
                    palette: str = "class", style: str = "textured", progress=None) -> int:
    """Render ``images_per_class * len(classes)`` shapes scenes with their exact label maps.

    ``palette`` "class" paints each class its own hue (the random tiny models' world); "random"
    draws every object's hue at random and ``style`` paints as a trained world does, so images
    look like the ones a world's head labels (there colour must not give a class away).
    Returns the number of scenes written now (existing ones are kept: reruns resume). The
    class list is written first and must match on a rerun."""
    if images_per_class <= 0 or objects <= 0:
        raise UserError(f"need positive images per class and objects (got {images_per_class}, {objects})", "pass numbers > 0")
    if split not in STREAM_OF_SPLIT:
        raise UserError(f"unknown split {split!r}", f"use one of {', '.join(STREAM_OF_SPLIT)}")
    if palette not in PALETTES:
        raise UserError(f"unknown palette {palette!r}", f"use one of {', '.join(PALETTES)}")
    root = Path(root)
    if (root / SEMANTIC_CLASSES).exists() and semantic_class_list(root)[1:] != list(classes):
        raise UserError(f"{root} holds a set of other classes", "choose another output directory or remove it")
    root.mkdir(parents=True, exist_ok=True)
    write_semantic_classes(root, list(classes))
    ids = class_ids(classes)
    written = 0
    total = images_per_class * len(classes)
    for index in range(total):
        key = IMAGE_KEY.format(index=index)
        if not semantic_label_path(root, split, key).exists():
            rng = np.random.default_rng([seed, EXACT_TAG, STREAM_OF_SPLIT[split], index])
            names = scene_classes(list(classes), index, objects, rng)
            hues = random_hues(rng, len(names)) if palette == "random" else None
            image, masks = render_scene(names, rng, size, hues, style)
            write_semantic_sample(root, split, key, image, label_map(masks, [ids[n] for n in names]))
            written += 1
        if progress is not None:
            progress(index + 1, total)
    return written
