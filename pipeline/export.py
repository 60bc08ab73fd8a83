"""The three export formats of ``iosd-synth`` (``iosd.export_layout`` says where files go).

Each writer takes finished chunks of labelled images and writes that chunk's files
atomically (a rerun rewrites a chunk cut short with the same bytes), returning a small JSON
record of what it wrote; ``finish`` assembles the files that cover the whole set (the COCO
JSON, ``classes.json``, the shard manifest) from those records. Images whose every class was
dropped by quality control are not exported; a dropped class of a kept image is left out of
COCO and marked ignored (255) in the semantic label map where no kept class claims its pixels.

The semantic reader and writer are public: other tools (GD's Protocol II) use them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from iosd import __version__
from iosd.errors import UserError
from iosd.export_layout import (
    BACKGROUND,
    BACKGROUND_ID,
    COCO_ANNOTATIONS,
    COCO_IMAGES,
    DEFAULT_SPLIT,
    FORMATS,
    IGNORE_ID,
    SEMANTIC_CLASSES,
    SEMANTIC_IMAGES,
    SEMANTIC_LABELS,
    SEMANTIC_SUFFIX,
)
from iosd.manifest import write_json_atomic
from iosd.pipeline.quality import Verdict
from iosd.viz import colour, save_png_atomic

MAX_CLASSES = IGNORE_ID - 1  # label ids 1..254 (0 background, 255 ignored)


@dataclass
class Labelled:
    """One image with the head's masks and verdicts for each class of its prompt."""

    index: int
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    seed: int
    names: list[str]
    probs: np.ndarray  # (N, H, W) float32, the head's probabilities at image size
    masks: np.ndarray  # (N, H, W) bool, probs above the threshold
    verdicts: list[Verdict]
    embeddings: np.ndarray | None = None  # (N, D) query embeddings (shards)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # (C, H, W) per layer (shards)

    @property
    def kept(self) -> bool:
        return any(v.kept for v in self.verdicts)


def class_ids(classes: Sequence[str]) -> dict[str, int]:
    """Label / category id of each class: 1, 2, ... in the order given (0 is background)."""
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{len(classes)} classes do not fit a uint8 label map", f"pass at most {MAX_CLASSES} classes")
    return {name: i + 1 for i, name in enumerate(classes)}


# -- semantic: MMSegmentation's custom-dataset layout --------------------------------------
def semantic_label(item: Labelled, ids: dict[str, int]) -> np.ndarray:
    """(H, W) uint8 label map: a pixel in a kept class's mask goes to the kept class with the
    highest probability there; one only in dropped classes' masks is ignored (its class is
    unknown); the rest is background."""
    h, w = item.image.shape[:2]
    label = np.full((h, w), BACKGROUND_ID, np.uint8)
    if not item.names:
        return label
    kept = np.array([v.kept for v in item.verdicts])
    scores = np.where(item.masks & kept[:, None, None], item.probs, -1.0)
    winner = scores.argmax(0)
    covered = scores.max(0) >= 0
    lut = np.array([ids[n] for n in item.names], np.uint8)
    label[covered] = lut[winner[covered]]
    label[item.masks.any(0) & ~covered] = IGNORE_ID
    return label


def _semantic_path(out: Path, folder: str, split: str, key: str) -> Path:
    return Path(out) / folder.format(split=split) / f"{key}{SEMANTIC_SUFFIX}"


def semantic_label_path(out: str | Path, split: str, key: str) -> Path:
    """Where sample ``key``'s label map lives (written after its image: its presence marks it done)."""
    return _semantic_path(Path(out), SEMANTIC_LABELS, split, key)


def write_semantic_sample(out: str | Path, split: str, key: str, image: np.ndarray, label: np.ndarray) -> tuple[Path, Path]:
    """An image and its uint8 label map as PNGs (atomically), in MMSegmentation's img_dir/ann_dir."""
    if image.shape[:2] != label.shape:
        raise UserError(f"label map {label.shape} of {key} differs from its image {image.shape[:2]}", "give one label per pixel")
    img = save_png_atomic(Image.fromarray(np.asarray(image, np.uint8)), _semantic_path(Path(out), SEMANTIC_IMAGES, split, key))
    ann = save_png_atomic(Image.fromarray(np.ascontiguousarray(label, np.uint8)), _semantic_path(Path(out), SEMANTIC_LABELS, split, key))
    return img, ann


def semantic_palette(classes: Sequence[str]) -> list[list[int]]:
    """Background black, then each class in the colour the overlays give it."""
    return [[0, 0, 0], *[list(colour(i)) for i in range(len(classes))]]


def write_semantic_classes(out: str | Path, classes: Sequence[str]) -> Path:
    """``classes.json``: MMSegmentation's ``metainfo`` (classes with background first, palette)."""
    class_ids(classes)
    path = Path(out) / SEMANTIC_CLASSES
    write_json_atomic(path, {"classes": [BACKGROUND, *classes], "palette": semantic_palette(classes), "ignore_index": IGNORE_ID})
    return path


def read_semantic_classes(out: str | Path) -> dict:
    """The ``classes.json`` of a semantic export."""
    path = Path(out) / SEMANTIC_CLASSES
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable class list ({err})", "point at a directory written by iosd-synth --format semantic") from None


def read_semantic_sample(out: str | Path, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, uint8 label map) of one exported sample."""
    with Image.open(_semantic_path(Path(out), SEMANTIC_IMAGES, split, key)) as img:
        image = np.asarray(img.convert("RGB"))
    with Image.open(_semantic_path(Path(out), SEMANTIC_LABELS, split, key)) as ann:
        label = np.asarray(ann)
    return image, label


def semantic_keys(out: str | Path, split: str = DEFAULT_SPLIT) -> list[str]:
    """Keys of the exported samples of a split, sorted."""
    return sorted(p.stem for p in (Path(out) / SEMANTIC_LABELS.format(split=split)).glob(f"*{SEMANTIC_SUFFIX}"))


# -- writers ------------------------------------------------------------------------------
class _FileExport:
    """An export of image files under ``out`` (nothing to prepare before the first chunk)."""

    def __init__(self, out: Path, classes: Sequence[str], split: str = DEFAULT_SPLIT) -> None:
        self.out, self.classes, self.split = Path(out), list(classes), split
        self.ids = class_ids(classes)

    def prepare(self) -> None:
        pass


class SemanticExport(_FileExport):
    """img_dir/ann_dir PNGs per kept image; ``classes.json`` at the end."""

    def write_chunk(self, chunk: int, items: list[Labelled]) -> dict:
        keys = []
        for item in items:
            if item.kept:
                write_semantic_sample(self.out, self.split, item.key, item.image, semantic_label(item, self.ids))
                keys.append(item.key)
        return {"samples": keys}

    def finish(self, records: list[dict]) -> dict[str, str]:
        write_semantic_classes(self.out, self.classes)
        return {"classes": SEMANTIC_CLASSES, "images": SEMANTIC_IMAGES.format(split=self.split), "labels": SEMANTIC_LABELS.format(split=self.split)}


def rle_of(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a bool mask, JSON-ready (pycocotools' own encoder)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_stats(rle: dict) -> tuple[float, list[float]]:
    """Area and COCO box (x, y, w, h) of an ``rle_of`` mask, as pycocotools computes them."""
    from pycocotools import mask as mask_util

    raw = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return float(mask_util.area(raw)), [float(x) for x in mask_util.toBbox(raw)]


class CocoExport(_FileExport):
    """images/<split>/<key>.png per kept image; one instances JSON, assembled at the end, with one
    annotation (RLE mask, area, box, the head's confidence as ``score``) per kept class."""

    def write_chunk(self, chunk: int, items: list[Labelled]) -> dict:
        images = []
        for item in items:
            if not item.kept:
                continue
            name = f"{item.key}.png"
            save_png_atomic(Image.fromarray(item.image), self.out / COCO_IMAGES.format(split=self.split) / name)
            h, w = item.image.shape[:2]
            anns = []
            for cls, mask, verdict in zip(item.names, item.masks, item.verdicts, strict=True):
                if verdict.kept:
                    rle = rle_of(mask)
                    area, bbox = rle_stats(rle)
                    anns.append({"category_id": self.ids[cls], "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0, "score": verdict.confidence})
            images.append({"index": item.index, "file_name": name, "width": w, "height": h, "prompt": item.prompt, "seed": item.seed, "annotations": anns})
        return {"images": images}

    def finish(self, records: list[dict]) -> dict[str, str]:
        images, annotations = [], []
        for record in records:
            for entry in record["images"]:
                image_id = entry["index"] + 1
                images.append({k: v for k, v in entry.items() if k not in ("index", "annotations")} | {"id": image_id})
                for ann in entry["annotations"]:
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
        coco = {
            "info": {"description": "iosd-synth: images of a diffusion model labelled by a trained grounding head", "version": __version__},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "object"} for n, i in self.ids.items()],
        }
        path = self.out / COCO_ANNOTATIONS.format(split=self.split)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, coco)
        return {"annotations": COCO_ANNOTATIONS.format(split=self.split), "images": COCO_IMAGES.format(split=self.split)}


class ShardsExport:
    """An iosd shard set, one shard per chunk (``ShardSetWriter``), so iosd-train can train on it.

    A class the head kept is a kept mask; a dropped one is recorded with the schema's nearest
    decision (empty mask, else low score, its score the head's confidence) and never trained on;
    the quality-control verdicts themselves ride along in each sample's JSON (``qc``)."""

    def __init__(self, out: Path, classes: Sequence[str], *, header: dict, n_chunks: int, feature_dtype: str, codec: str) -> None:
        from iosd.pipeline.writer import ShardSetWriter

        self.out, self.classes = Path(out), list(classes)
        self.writer = ShardSetWriter(out, header, n_chunks)
        self.feature_dtype, self.codec = feature_dtype, codec

    def prepare(self) -> None:
        """The directory was checked by the caller (it is ours): the writer's folders and a first manifest."""
        self.writer.parts.mkdir(parents=True, exist_ok=True)
        self.writer.write_manifest()

    def _members(self, item: Labelled) -> dict:
        from iosd.featstore import encode_features
        from iosd.schema import EMPTY_MASK, KEPT, LOW_SCORE, ClassRecord, Sample, encode_sample

        records, kept = [], []
        for name, mask, verdict in zip(item.names, item.masks, item.verdicts, strict=True):
            decision = KEPT if verdict.kept else EMPTY_MASK if verdict.decision == EMPTY_MASK else LOW_SCORE
            records.append(ClassRecord(name, "seen", verdict.confidence, int(mask.sum()), decision, len(kept) if verdict.kept else None))
            if verdict.kept:
                kept.append(mask.astype(np.uint8))
        h, w = item.image.shape[:2]
        sample = Sample(
            key=item.key,
            image=item.image,
            prompt=item.prompt,
            seed=item.seed,
            classes=records,
            masks=np.stack(kept) if kept else np.zeros((0, h, w), np.uint8),
            embeddings=item.embeddings,
            extra={"index": item.index, "source": "synth", "qc": [v.to_json() for v in item.verdicts]},
        )
        return encode_sample(sample, encode_features(item.features, self.feature_dtype, self.codec))

    def write_chunk(self, chunk: int, items: list[Labelled]) -> dict:
        members = [self._members(item) for item in items if item.kept]
        stats = {"written": len(members), "candidates": len(items), "dropped_samples": len(items) - len(members), "feature_bytes": sum(len(m["feat.zarr.zip"]) for m in members)}
        record = self.writer.write_shard(chunk, members, stats)
        return {"shard": record["name"], "samples": record["samples"]}

    def finish(self, records: list[dict]) -> dict[str, str]:
        from iosd.pipeline.writer import WIDS_INDEX_NAME
        from iosd.schema import MANIFEST_NAME

        self.writer.write_manifest()
        return {"manifest": MANIFEST_NAME, "wids_index": WIDS_INDEX_NAME}


def make_export(fmt: str, out: Path, classes: Sequence[str], **shards_options):
    """The writer of format ``fmt``; ``shards_options`` (header, n_chunks, feature_dtype, codec)
    only for shards."""
    if fmt == "coco":
        return CocoExport(out, classes)
    if fmt == "semantic":
        return SemanticExport(out, classes)
    if fmt == "shards":
        return ShardsExport(out, classes, **shards_options)
    raise UserError(f"unknown --format {fmt!r}", f"use one of {', '.join(FORMATS)}")

