"""Your own images in: ``iosd-gen --source coco:PATH`` and ``folder:PATH`` on tiny sources
(tiny model, shapes split 1: disc and square seen, star unseen), resume, iosd-eval on the
result, and every refusal as one line with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as coco_mask

from iosd.evaluate.cli import main as eval_main
from iosd.manifest import read_manifest
from iosd.pipeline.cli import main as gen_main
from iosd.schema import iter_tar_samples
from iosd.train.cli import main as train_main

SIZE = 128  # the tiny model's resolution
COMMON = ["--classes", "shapes", "--split", "1", "--model", "tiny", "--shard-size", "2", "--batch-size", "2", "--quiet"]
CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"}, {"id": 5, "name": "star"}, {"id": 9, "name": "zebra"}]


def expected_fit(mask: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The centered square of ``mask``, nearest-neighbour resized, by index arithmetic."""
    h, w = mask.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    idx = np.minimum(((np.arange(size) + 0.5) * side / size).astype(int), side - 1)
    return mask[top : top + side, left : left + side][np.ix_(idx, idx)].astype(bool)


def polygon_mask(poly: list[float], w: int, h: int) -> np.ndarray:
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([poly], h, w))).astype(bool)


def box(w: int, h: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(mask: np.ndarray, compressed: bool = True) -> dict:
    if compressed:
        r = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": r["size"], "counts": r["counts"].decode()}
    flat, counts, value, run = mask.T.ravel(), [], False, 0  # column-major runs, starting with zeros
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def write_coco(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """COCO layout (annotations/instances_val.json, val/); returns file -> class -> full-size truth."""
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, anns, truth = [], [], {}

    def add(image_id: int, cat: int, seg) -> None:
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "segmentation": seg, "iscrowd": int(isinstance(seg, dict))})

    sizes = {"im0.jpg": (40, 32), "im1.png": (32, 48), "im2.png": (36, 36), "im3.png": (44, 30), "im4.png": (30, 30)}
    for k, (name, (w, h)) in enumerate(sizes.items()):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "val" / name)
        images.append({"id": 100 - k, "file_name": name, "width": w, "height": h})  # ids out of file order
    p1, p2 = [2, 2, 15, 3, 14, 16, 3, 14], [20, 30, 30, 30, 25, 45]
    add(100, 1, [p1])
    add(100, 2, rle(box(40, 32, 20, 16, 40, 32)))
    truth["im0.jpg"] = {"disc": polygon_mask(p1, 40, 32), "square": box(40, 32, 20, 16, 40, 32)}
    add(99, 1, [p1])
    add(99, 1, [p2])  # two instances: their union
    add(99, 5, rle(box(32, 48, 4, 30, 20, 44), compressed=False))
    truth["im1.png"] = {"disc": polygon_mask(p1, 32, 48) | polygon_mask(p2, 32, 48), "star": box(32, 48, 4, 30, 20, 44)}
    add(98, 9, [p1])  # zebra only: no class of the split
    add(97, 2, rle(box(44, 30, 0, 0, 10, 30)))
    add(97, 5, [[30, 5, 40, 5, 40, 20]])
    add(97, 5, rle(box(44, 30, 38, 20, 44, 30)))  # a crowd region of the same class
    truth["im3.png"] = {"square": box(44, 30, 0, 0, 10, 30), "star": polygon_mask([30, 5, 40, 5, 40, 20], 44, 30) | box(44, 30, 38, 20, 44, 30)}
    add(96, 5, [p1])
    truth["im4.png"] = {"star": polygon_mask(p1, 30, 30)}
    (root / "annotations" / "instances_val.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES}))
    return truth


def write_folder(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """images/<stem>.* and masks/<class>/<stem>.png in three PNG modes; returns truth as write_coco."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    shapes = {"a": (40, 30, ".png"), "b": (30, 40, ".jpg"), "c": (32, 32, ".png")}
    for stem, (w, h, ext) in shapes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{stem}{ext}")
    masks = {("a", "disc"): box(40, 30, 5, 5, 20, 20), ("a", "square"): box(40, 30, 15, 10, 40, 30), ("b", "square"): box(30, 40, 0, 20, 30, 40),
             ("b", "star"): box(30, 40, 3, 3, 12, 12), ("c", "star"): box(32, 32, 8, 8, 24, 24)}
    truth: dict[str, dict[str, np.ndarray]] = {}
    for (stem, name), m in masks.items():
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        if name == "square":  # colour mask: any nonzero channel is inside
            img = Image.fromarray(np.stack([np.zeros_like(m), m * 7, np.zeros_like(m)], -1).astype(np.uint8))
        elif name == "star":  # palette mask
            img = Image.fromarray(m.astype(np.uint8)).convert("P")
        else:
            img = Image.fromarray(m.astype(np.uint8) * 255)
        img.save(root / "masks" / name / f"{stem}.png")
        truth.setdefault(f"{stem}{shapes[stem][2]}", {})[name] = m
    return truth


def gen(*args: str):
    return CliRunner().invoke(gen_main, [*COMMON, *args])


def shard_state(out: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.tar"))}


def check_samples(out: Path, truth: dict, expect: dict[str, list[str]]) -> None:
    """Each image once, in order, with its classes (split order, right subset) and its masks resized."""
    manifest = read_manifest(out)
    unseen = set(manifest["classes"]["unseen"])
    samples = [s for shard in manifest["shards"] for s in iter_tar_samples(str(out / shard["name"]), features=False)]
    assert [s.extra["image"] for s in samples] == list(expect)
    for s in samples:
        assert s.image.shape == (SIZE, SIZE, 3)
        assert [c.name for c in s.classes] == expect[s.extra["image"]]
        assert s.prompt.startswith("a photograph of a " + expect[s.extra["image"]][0])
        for c in s.classes:
            assert c.subset == ("unseen" if c.name in unseen else "seen") and c.score == 1.0
            assert c.decision == "kept", (s.extra["image"], c)
            np.testing.assert_array_equal(s.masks[c.mask_index].astype(bool), expected_fit(truth[s.extra["image"]][c.name]))


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    truth = write_coco(root / "src")
    out = root / "shards"
    result = gen("--source", f"coco:{root / 'src/annotations/instances_val.json'}", "--subset", "all", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, truth, ["--source", f"coco:{root / 'src/annotations/instances_val.json'}", "--subset", "all", "--out", str(out)]


def test_coco_source_writes_the_annotated_masks_and_classes(coco_set):
    out, truth, _ = coco_set
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["counts"]["written"] == 4 and len(manifest["shards"]) == 2
    assert manifest["teacher"]["annotations"] == "coco" and manifest["teacher"]["categories_not_in_split"] == ["zebra"]
    assert manifest["config"]["feature_t"] == 50 and manifest["identity"]["source_fingerprint"]
    # by image id: im4 (96), im3 (97), im1 (99), im0 (100); im2 shows only a zebra
    check_samples(out, truth, {"im4.png": ["star"], "im3.png": ["square", "star"], "im1.png": ["disc", "star"], "im0.jpg": ["disc", "square"]})


def test_rerun_resumes_without_rewriting_and_redoes_a_lost_shard(coco_set):
    out, _, args = coco_set
    before = shard_state(out)
    result = gen(*args)
    assert result.exit_code == 0, result.output
    assert shard_state(out) == before  # nothing rewritten
    (out / "shard-000001.tar").unlink()
    result = gen(*args)
    assert result.exit_code == 0, result.output
    after = shard_state(out)
    assert after["shard-000001.tar"][0] == before["shard-000001.tar"][0]  # the same bytes again
    assert after["shard-000000.tar"] == before["shard-000000.tar"]


@pytest.fixture(scope="module")
def folder_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    truth = write_folder(root / "src")
    out = root / "shards"
    result = gen("--source", f"folder:{root / 'src'}", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, truth


def test_folder_source_takes_seen_classes_only(folder_set):
    out, truth = folder_set
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["subset"] == "seen" and manifest["teacher"]["skipped_images"] == 1
    check_samples(out, truth, {"a.png": ["disc", "square"], "b.jpg": ["square"]})  # c shows only the unseen star


def test_the_same_images_as_coco_give_the_same_samples(folder_set, tmp_path):
    folder_out, truth = folder_set
    images = folder_out.parent / "src" / "images"
    names, cats = sorted(truth), {c["name"]: c["id"] for c in CATEGORIES}
    coco = {"images": [{"id": k, "file_name": n, "width": next(iter(truth[n].values())).shape[1], "height": next(iter(truth[n].values())).shape[0]} for k, n in enumerate(names)],
            "annotations": [{"id": len(names) * k + j, "image_id": k, "category_id": cats[c], "segmentation": rle(m), "iscrowd": 0} for k, n in enumerate(names) for j, (c, m) in enumerate(truth[n].items())],
            "categories": CATEGORIES}
    ann = tmp_path / "mine.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "shards"
    result = gen("--source", f"coco:{ann}:{images}", "--out", str(out))
    assert result.exit_code == 0, result.output
    pairs = zip(iter_tar_samples(str(folder_out / "shard-000000.tar")), iter_tar_samples(str(out / "shard-000000.tar")), strict=True)
    for a, b in pairs:
        assert a.extra["image"] == b.extra["image"] and a.prompt == b.prompt and [c.to_json() for c in a.classes] == [c.to_json() for c in b.classes]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.features.keys() == b.features.keys() and all(np.array_equal(a.features[k], b.features[k]) for k in a.features)


def test_eval_scores_a_head_on_real_image_shards(coco_set, tmp_path):
    out, _, _ = coco_set
    run = tmp_path / "run"
    result = CliRunner().invoke(train_main, [str(out), "--steps", "1", "--batch-size", "1", "--out", str(run), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    report = tmp_path / "report"
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--test-shards", str(out), "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((report / "report.json").read_text())
    assert set(data["methods"]) == {"head"}  # no DAAM maps for images no prompt made
    assert data["provenance"]["test_shards"]["source"].startswith("coco:")
    assert data["provenance"]["counts"]["images"] == {"star": 3, "square": 2, "disc": 2}
    two = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--test-shards", str(out), "--objects", "2", "--quiet"])
    assert two.exit_code == 2 and "no two-object prompt groups" in two.output
    bare = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--quiet"])  # would build test images per class
    assert bare.exit_code == 2 and "then iosd-eval --test-shards DIR" in bare.output
    assert not (out.parent / f"{out.name}-test").exists()


def test_coco_images_are_found_in_either_layout_or_where_told(tmp_path):
    from iosd.classes import load_split
    from iosd.pipeline.real_images import open_labelled

    ann = _coco(tmp_path)
    split = load_split("shapes", 1)
    standard = open_labelled(f"coco:{ann}", split, "all")
    (tmp_path / "src" / "images").mkdir()
    (tmp_path / "src" / "val").rename(tmp_path / "src" / "images" / "val")  # iosd-synth's coco export layout
    exported = open_labelled(f"coco:{ann}", split, "all")
    moved = tmp_path / "elsewhere"
    (tmp_path / "src" / "images" / "val").rename(moved)
    told = open_labelled(f"coco:{ann}:{moved}", split, "all")
    assert [i.path.name for i in standard.items] == [i.path.name for i in exported.items] == [i.path.name for i in told.items]
    assert {i.path.parent.name for i in exported.items} == {"val"} and {i.path.parent for i in told.items} == {moved}
    assert [i.names for i in told.items] == [["star"], ["square", "star"], ["disc", "star"], ["disc", "square"]]


# -- bad input: one line, exit 2, nothing written ----------------------------------------------
def _coco(tmp: Path) -> Path:
    write_coco(tmp / "src")
    return tmp / "src" / "annotations" / "instances_val.json"


def _edit_coco(tmp: Path, change) -> list[str]:
    ann = _coco(tmp)
    data = json.loads(ann.read_text())
    change(data, tmp / "src")
    ann.write_text(json.dumps(data))
    return ["--source", f"coco:{ann}", "--subset", "all"]


def not_json(tmp):
    ann = _coco(tmp)
    ann.write_text("{ not json")
    return ["--source", f"coco:{ann}"]


def no_lists(tmp):
    return _edit_coco(tmp, lambda d, _: d.pop("categories"))


def images_missing(tmp):
    ann = _coco(tmp)
    for name in ("im0.jpg", "im1.png", "im3.png", "im4.png"):
        (tmp / "src" / "val" / name).unlink()
    return ["--source", f"coco:{ann}", "--subset", "all"]


def rle_of_another_size(tmp):
    return _edit_coco(tmp, lambda d, _: d["annotations"][1]["segmentation"].update(size=[10, 10]))


def image_of_another_size(tmp):
    return _edit_coco(tmp, lambda d, root: Image.new("RGB", (8, 8)).save(root / "val" / "im4.png"))


def bad_polygon(tmp):
    return _edit_coco(tmp, lambda d, _: d["annotations"][0].update(segmentation=[[1, 2, 3, 4]]))


def images_not_found(tmp):
    ann = _coco(tmp)
    shutil.rmtree(tmp / "src" / "val")
    return ["--source", f"coco:{ann}"]


def coco_only_zebras(tmp):
    return _edit_coco(tmp, lambda d, _: d.update(annotations=[a for a in d["annotations"] if a["category_id"] == 9]))


def folder_mask_of_another_size(tmp):
    write_folder(tmp / "src")
    Image.new("L", (7, 9)).save(tmp / "src" / "masks" / "disc" / "a.png")
    return ["--source", f"folder:{tmp / 'src'}"]


def folder_unknown_class(tmp):
    write_folder(tmp / "src")
    (tmp / "src" / "masks" / "disc").rename(tmp / "src" / "masks" / "zebra")
    return ["--source", f"folder:{tmp / 'src'}"]


def folder_empty(tmp):
    write_folder(tmp / "src")
    shutil.rmtree(tmp / "src" / "masks")
    (tmp / "src" / "masks").mkdir()
    return ["--source", f"folder:{tmp / 'src'}"]


def folder_mask_without_image(tmp):
    write_folder(tmp / "src")
    shutil.copy(tmp / "src" / "masks" / "disc" / "a.png", tmp / "src" / "masks" / "disc" / "zz.png")
    return ["--source", f"folder:{tmp / 'src'}"]


@pytest.mark.parametrize(
    "make,message",
    [
        (not_json, "is not a COCO instances file: JSONDecodeError"),
        (no_lists, "is not a COCO instances file: no categories list"),
        (images_missing, "4 of the 4 annotated images of"),
        (rle_of_another_size, "is a 10x10 mask on a 40x32 image"),
        (image_of_another_size, "is 8x8 but"),
        (bad_polygon, "is not a list of polygons"),
        (images_not_found, "cannot find the images of"),
        (coco_only_zebras, "holds no image showing a class of --subset all of shapes split 1"),
        (folder_mask_of_another_size, "is 7x9, its image a.png is 40x30"),
        (folder_unknown_class, "mask folder(s) zebra in"),
        (folder_empty, "holds no image showing a class of --subset seen"),
        (folder_mask_without_image, "has no image images/zz.*"),
        (lambda tmp: ["--source", "coco"], "unknown --source 'coco'"),
        (lambda tmp: ["--source", "folder:"], "names no path"),
        (lambda tmp: ["--source", f"coco:{_coco(tmp)}", "--negative"], "drop --negative"),
        (lambda tmp: ["--source", f"coco:{_coco(tmp)}", "--num-samples", "99"], "asks for more than the 3 usable images"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_bad_source_is_one_line_and_writes_nothing(make, message, tmp_path):
    out = tmp_path / "out"
    result = gen(*make(tmp_path), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
    if message.startswith("4 of the 4"):
        assert "im4.png, im3.png, im1.png and 1 more" in result.output
