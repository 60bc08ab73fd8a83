"""A user's own labelled images, read for ``iosd-gen --source coco:PATH`` and ``folder:PATH``.

Both kinds are checked whole before anything is written (a file that does not parse, missing
images, masks of another size than their image, a class folder the split does not know, no
usable image: one line each), then read one image at a time. A class of an image is its
ground truth as annotated, no teacher: under COCO the union of that category's instances
(crowd regions included), under a folder the class's mask file. Category and folder names
match the split's classes as the teacher's labels do (``iosd.classes.canonical``: VOC
spellings find COCO labels). Each image is center-cropped to a square, as ``iosd-predict
--image`` takes one, and resized to the generation's resolution: the image bilinear (Pillow
antialiases when shrinking), its masks nearest, so a mask stays 0/1.

Layouts are ``iosd.export_layout``'s. Images are taken in a fixed order (COCO image id, folder
file name), so image ``i`` is the same on every rank and every rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from iosd.classes import ClassSplit, canonical
from iosd.errors import UserError
from iosd.export_layout import (
    COCO_ANNOTATIONS_PATTERN,
    COCO_IMAGE_DIRS_IN,
    FOLDER_IMAGE_SUFFIXES,
    FOLDER_IMAGES,
    FOLDER_MASK_SUFFIX,
    FOLDER_MASKS,
)

COCO, FOLDER = "coco", "folder"
KINDS = (COCO, FOLDER)
SHOWN = 3  # names listed when several files are wrong


def _listing(items: list[str]) -> str:
    """The first few of ``items``, and how many more."""
    head = ", ".join(items[:SHOWN])
    return head + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _checking(items: list, what: str, show: bool):
    """``items``, with a transient progress bar when ``show`` (large sources take a while to check)."""
    from rich.progress import track

    return track(items, description=f"checking {what}", transient=True, disable=not show or len(items) < 1000)


def square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centered square crop of a ``width`` x ``height`` image (as iosd-predict --image)."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the centered square, bilinear (antialiased when shrinking)."""
    return np.asarray(image.convert("RGB").crop(square_box(*image.size)).resize((size, size), Image.BILINEAR))


def fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool: the same square as the image, nearest neighbour."""
    h, w = mask.shape
    img = Image.fromarray(mask.astype(np.uint8) * 255).crop(square_box(w, h))
    return np.asarray(img.resize((size, size), Image.NEAREST)) > 0


def class_matcher(split: ClassSplit, subset: str):
    """name -> the split class it spells (or None), and whether that class is in ``subset``."""
    by_label = {canonical(c): c for c in split.all}
    wanted = set(split.subset(subset))

    def match(name: str) -> tuple[str | None, bool]:
        found = name if name in split.all else by_label.get(canonical(name))
        return found, found in wanted

    return match


@dataclass
class LabelledImage:
    """One usable image: its file, the split classes it shows (split order) and where it came from."""

    path: Path
    size: tuple[int, int]  # (width, height)
    names: list[str]
    origin: dict  # recorded in the sample's json


@dataclass
class LabelledImages:
    """A checked set of labelled images; ``load(i, size)`` gives image ``i`` and its masks."""

    kind: str
    spec: str
    items: list[LabelledImage]
    fingerprint: str  # changes when the annotations or the files change: a changed source is another config
    info: dict = field(default_factory=dict)  # counts for the manifest

    def __len__(self) -> int:
        return len(self.items)

    def full_masks(self, index: int) -> list[np.ndarray]:
        raise NotImplementedError

    def load(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` as (size, size, 3) uint8 and its (N, size, size) bool masks, ``names`` order."""
        item = self.items[index]
        try:
            with Image.open(item.path) as img:
                image = fit_image(img, size)
            masks = [fit_mask(m, size) for m in self.full_masks(index)]
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"{item.path} (or a mask of it) could not be read ({err})", "replace it; finished shards are kept and a rerun resumes") from None
        return image, np.stack(masks)

    def notes(self) -> list[str]:
        """What was left out, for the user to see."""
        out = []
        if self.info.get("categories_not_in_split"):
            out.append(f"{self.spec}: categories {_listing(self.info['categories_not_in_split'])} are no class of the split: their instances are left out")
        if self.info.get("skipped_images"):
            out.append(f"{self.spec}: {self.info['skipped_images']} images show no class asked for (--classes/--split/--subset): left out")
        return out

    def describe(self) -> dict:
        """The manifest's record of where the ground truth came from."""
        return {"kind": "exact", "source": self.spec, "annotations": self.kind, "images": len(self.items), **self.info}


def open_labelled(spec: str, split: ClassSplit, subset: str, *, progress: bool = False) -> LabelledImages:
    """The images of ``coco:ANN.json[:IMAGES_DIR]`` or ``folder:DIR`` that show a ``subset`` class."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest:
        raise UserError(f"--source {spec!r} names no path", "pass coco:ANNOTATIONS.json[:IMAGES_DIR] or folder:DIR")
    if kind == COCO:
        ann, _, images = rest.partition(":")
        return CocoImages.open(spec, Path(ann), Path(images) if images else None, split, subset, progress)
    return FolderImages.open(spec, Path(rest), split, subset, progress)


def check_labelled_options(source: str, *, negative: bool, images_per_class: int | None) -> None:
    """Refuse generation options that have no meaning for labelled images (before any work)."""
    kind, _, path = source.partition(":")
    if not path:
        raise UserError(f"--source {source} names no path", "pass coco:ANNOTATIONS.json[:IMAGES_DIR] or folder:DIR")
    if negative:
        raise UserError(f"--negative adds a class the image does not show; --source {kind} takes the classes annotated", "drop --negative")
    if images_per_class is not None:
        raise UserError(f"test images of a --source {kind} set are the images given, not a number per class",
                        f"build them with iosd-gen --source {source} --subset all --out DIR, then iosd-eval --test-shards DIR")


def default_set_name(source: str) -> str:
    """The part of the default --out a labelled source adds: the file or folder name."""
    _, _, rest = source.partition(":")
    return Path(rest.partition(":")[0].rstrip("/")).stem or "images"


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path} is not a readable image ({err})", "replace or remove it") from None


def _empty(spec: str, split: ClassSplit, subset: str, detail: str) -> UserError:
    return UserError(f"--source {spec} holds no image showing a class of --subset {subset} of {split.name} split {split.split} ({detail})",
                     "check the class names against --classes/--split, or pass --subset all")


# -- COCO ------------------------------------------------------------------------------------
def _bad_coco(path: Path, what: str) -> UserError:
    return UserError(f"{path} is not a COCO instances file: {what}", "pass an instances JSON with images, annotations and categories (pycocotools reads it)")


def _read_coco(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"COCO file {path} does not exist", "pass coco:PATH/TO/instances_<split>.json") from None
    except IsADirectoryError:
        raise UserError(f"COCO file {path} is a directory", "pass coco:PATH/TO/instances_<split>.json") from None
    except (OSError, ValueError) as err:
        raise _bad_coco(path, f"{type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise _bad_coco(path, "its top level is not an object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise _bad_coco(path, f"no {', '.join(missing)} list")
    return data


def _check_entries(path: Path, data: dict) -> None:
    """Every entry has the fields pycocotools reads, of the right types."""
    needs = {"images": {"id": int, "file_name": str, "width": int, "height": int}, "categories": {"id": int, "name": str},
             "annotations": {"id": int, "image_id": int, "category_id": int}}
    for section, fields_ in needs.items():
        for i, entry in enumerate(data[section]):
            if not isinstance(entry, dict):
                raise _bad_coco(path, f"{section}[{i}] is not an object")
            for key, kind in fields_.items():
                if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                    raise _bad_coco(path, f"{section}[{i}] has no {kind.__name__} {key!r}")


def _segmentation_problem(seg, width: int, height: int) -> str | None:
    """Why pycocotools could not rasterise ``seg`` onto a ``width`` x ``height`` image, or None."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(isinstance(v, int | float) for v in p) for p in seg):
            return "is not a list of polygons of at least 3 (x, y) points"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, str | list)):
            return "is not an RLE with size and counts"
        if list(size) != [height, width]:
            return f"is a {size[1]}x{size[0]} mask on a {width}x{height} image (masks must have their image's size)"
        return None
    return "is neither polygons nor an RLE"


def _coco_images_dir(ann: Path) -> Path:
    """Where COCO's own layout (or iosd-synth's coco export) puts the images of ``ann``."""
    pattern = re.escape(COCO_ANNOTATIONS_PATTERN).replace(re.escape("{split}"), "(.+)")
    found = re.fullmatch(pattern, ann.name)
    tried = []
    if found:
        root = ann.resolve().parent.parent
        for layout in COCO_IMAGE_DIRS_IN:
            candidate = root / layout.format(split=found.group(1))
            if candidate.is_dir():
                return candidate
            tried.append(str(candidate))
    where = f"none of {', '.join(tried)} exists" if tried else f"{ann.name} is not named {COCO_ANNOTATIONS_PATTERN}"
    raise UserError(f"cannot find the images of {ann}: {where}", f"pass the image folder: --source coco:{ann}:IMAGES_DIR")


@dataclass
class CocoImages(LabelledImages):
    """A COCO instances file with its image folder; masks rasterised by pycocotools."""

    coco: object = None  # pycocotools.coco.COCO
    category_class: dict[int, str] = field(default_factory=dict)  # category id -> split class of the subset

    @classmethod
    def open(cls, spec: str, ann: Path, images: Path | None, split: ClassSplit, subset: str, progress: bool = False) -> CocoImages:
        raw = _read_coco(ann)
        _check_entries(ann, raw)
        images = images if images is not None else _coco_images_dir(ann)
        if not images.is_dir():
            raise UserError(f"image folder {images} of {ann} does not exist", f"pass the image folder: --source coco:{ann}:IMAGES_DIR")
        match = class_matcher(split, subset)
        categories = {c["id"]: c["name"] for c in raw["categories"]}
        classes = {cid: match(name) for cid, name in categories.items()}
        by_id = {im["id"]: im for im in raw["images"]}
        present: dict[int, set[str]] = {}
        for i, a in enumerate(raw["annotations"]):
            image = by_id.get(a["image_id"])
            if image is None or a["category_id"] not in categories:
                raise _bad_coco(ann, f"annotations[{i}] refers to an unknown {'image' if image is None else 'category'}")
            problem = _segmentation_problem(a.get("segmentation"), image["width"], image["height"])
            if problem:
                raise UserError(f"{ann}: the segmentation of annotations[{i}] (image {image['file_name']}) {problem}", "fix or remove that annotation")
            name, wanted = classes[a["category_id"]]
            if wanted:
                present.setdefault(a["image_id"], set()).add(name)
        order = {c: k for k, c in enumerate(split.all)}
        items = [LabelledImage(images / by_id[i]["file_name"], (by_id[i]["width"], by_id[i]["height"]), sorted(present[i], key=order.__getitem__),
                               {"image": by_id[i]["file_name"], "image_id": i}) for i in sorted(present)]
        unknown = sorted(name for cid, name in categories.items() if classes[cid][0] is None)
        if not items:
            raise _empty(spec, split, subset, f"its categories: {_listing(sorted(categories.values()))}")
        _check_files(ann, images, items, progress)
        digest = hashlib.sha256(ann.read_bytes())
        for item in items:
            digest.update(f"{item.origin['image']}\0{item.path.stat().st_size}\0".encode())
        info = {"annotation_images": len(raw["images"]), "skipped_images": len(raw["images"]) - len(items), "categories_not_in_split": unknown}
        return cls(COCO, spec, items, digest.hexdigest(), info, _coco_index(raw), {cid: found for cid, (found, wanted) in classes.items() if wanted})

    def full_masks(self, index: int) -> list[np.ndarray]:
        """Per class of the image, the union of its instances at the image's own size."""
        item = self.items[index]
        width, height = item.size
        union = {n: np.zeros((height, width), bool) for n in item.names}
        for a in self.coco.imgToAnns[item.origin["image_id"]]:
            name = self.category_class.get(a["category_id"])
            if name in union:
                union[name] |= self.coco.annToMask(a).astype(bool)
        return [union[n] for n in item.names]


def _coco_index(data: dict):
    """pycocotools' COCO over already-read data (its loader prints to stdout; this does not)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_files(ann: Path, images: Path, items: list[LabelledImage], progress: bool = False) -> None:
    """Every used image exists, is readable and has the size its annotations were drawn on."""
    missing = [item.origin["image"] for item in items if not item.path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(items)} annotated images of {ann} are missing under {images}: {_listing(missing)}",
                        f"pass the image folder: --source coco:{ann}:IMAGES_DIR")
    for item in _checking(items, "image sizes", progress):
        actual = _image_size(item.path)
        if actual != item.size:
            raise UserError(f"{item.path} is {actual[0]}x{actual[1]} but {ann} annotates it as {item.size[0]}x{item.size[1]}",
                            "masks must have their image's size: fix width/height or the image")


# -- folder ----------------------------------------------------------------------------------
def read_mask(path: Path) -> np.ndarray:
    """(H, W) bool: nonzero in any colour channel (alpha ignored) is inside."""
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "PA"):
            img = img.convert("L" if img.mode == "LA" else "RGB")
        arr = np.asarray(img)
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


@dataclass
class FolderImages(LabelledImages):
    """``DIR/images/<stem>.<ext>`` with ``DIR/masks/<class name>/<stem>.png`` per class shown."""

    root: Path = Path()

    @classmethod
    def open(cls, spec: str, root: Path, split: ClassSplit, subset: str, progress: bool = False) -> FolderImages:
        layout = f"{FOLDER_IMAGES}/<stem>.png|jpg and {FOLDER_MASKS}/<class name>/<stem>{FOLDER_MASK_SUFFIX}"
        if not root.is_dir():
            raise UserError(f"folder source {root} is not a directory", f"pass folder:DIR with {layout}")
        image_dir, mask_dir = root / FOLDER_IMAGES, root / FOLDER_MASKS
        for needed in (image_dir, mask_dir):
            if not needed.is_dir():
                raise UserError(f"folder source {root} has no {needed.name}/ folder", f"lay it out as {layout}")
        stems: dict[str, Path] = {}
        for path in sorted(image_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in FOLDER_IMAGE_SUFFIXES:
                if path.stem in stems:
                    raise UserError(f"{image_dir} holds two images named {path.stem} ({stems[path.stem].name}, {path.name})", "keep one image per name")
                stems[path.stem] = path
        match = class_matcher(split, subset)
        class_dirs = sorted(p for p in mask_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [d.name for d in class_dirs if match(d.name)[0] is None]
        if unknown:
            raise UserError(f"mask folder(s) {_listing(unknown)} in {mask_dir} name no class of {split.name} split {split.split}",
                            f"rename them to class names ({_listing(list(split.all))}) or pass --classes with your split")
        shown: dict[str, dict[str, Path]] = {}  # stem -> class -> mask file
        for d in class_dirs:
            name, wanted = match(d.name)
            for path in sorted(d.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                if path.suffix.lower() != FOLDER_MASK_SUFFIX:
                    raise UserError(f"mask {path} is not a PNG", "save masks as PNG (lossless), nonzero = inside")
                if path.stem not in stems:
                    raise UserError(f"mask {path} has no image {FOLDER_IMAGES}/{path.stem}.*", "name each mask after its image")
                if wanted:
                    if name in shown.setdefault(path.stem, {}):
                        raise UserError(f"{path.stem} has two masks of {name}", "keep one mask per class and image")
                    shown[path.stem][name] = path
        order = {c: k for k, c in enumerate(split.all)}
        items = []
        for stem in _checking(sorted(shown), "images", progress):
            names = sorted(shown[stem], key=order.__getitem__)
            items.append(LabelledImage(stems[stem], _image_size(stems[stem]), names, {"image": stems[stem].name, "mask_files": {n: str(shown[stem][n].relative_to(root)) for n in names}}))
        if not items:
            detail = f"class folders: {_listing([d.name for d in class_dirs])}" if class_dirs else f"{mask_dir} has no class folder"
            raise _empty(spec, split, subset, f"{len(stems)} images, {detail}")
        digest = hashlib.sha256()
        for item in _checking(items, "mask sizes", progress):
            for path in [item.path, *(root / m for m in item.origin["mask_files"].values())]:
                digest.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
            for rel in item.origin["mask_files"].values():
                size = _image_size(root / rel)
                if size != item.size:
                    raise UserError(f"mask {root / rel} is {size[0]}x{size[1]}, its image {item.path.name} is {item.size[0]}x{item.size[1]}",
                                    "masks must have their image's size")
        return cls(FOLDER, spec, items, digest.hexdigest(), {"folder_images": len(stems), "skipped_images": len(stems) - len(items)}, root)

    def full_masks(self, index: int) -> list[np.ndarray]:
        item = self.items[index]
        return [read_mask(self.root / item.origin["mask_files"][n]) for n in item.names]
