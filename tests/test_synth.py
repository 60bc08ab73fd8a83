"""iosd-synth end to end on a tiny head trained on shapes-world shards: each export read back
with its own reader, quality-control filters, resume, a diffusion checkpoint, and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import QUICK_TRAIN, make_tiny_run
from PIL import Image

from iosd.export_layout import COCO_ANNOTATIONS, COCO_IMAGES, IGNORE_ID, PARTS, PREVIEW, REPORT
from iosd.pipeline.export import read_semantic_classes, read_semantic_sample, semantic_keys
from iosd.pipeline.quality import (
    LOW_AGREEMENT,
    LOW_CONFIDENCE,
    TOO_LARGE,
    TOO_SMALL,
    Limits,
    judge_mask,
)
from iosd.pipeline.synth import SynthConfig, Synthesizer, read_class_names
from iosd.pipeline.synth_cli import main as synth_main
from iosd.schema import EMPTY_MASK, KEPT, iter_tar_samples
from iosd.train.checkpoint import CHECKPOINT_NAME
from iosd.train.cli import main as train_main

CLASSES = "disc,star,heart"


def synth(run, out, *args) -> object:
    return CliRunner().invoke(synth_main, ["--checkpoint", str(run), "--out", str(out), "--quiet", *map(str, args)])


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def report(out) -> dict:
    return json.loads((out / REPORT).read_text())


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A tiny iosd-lite head trained a few steps on a small 64 px shapes-world set (cheap to make)."""
    return make_tiny_run(tmp_path_factory.mktemp("synth"), steps=6)


@pytest.fixture(scope="module")
def coco_out(head_run, tmp_path_factory):
    """Two images per class, about half of them two-object prompts, in two chunks of three."""
    out = tmp_path_factory.mktemp("synth") / "coco"
    ok(synth(head_run, out, "--classes", CLASSES, "--images-per-class", 2, "--objects", "mix", "--chunk-size", 3, "--batch", 3))
    return out


def test_coco_export_reads_back_with_pycocotools(coco_out):
    from pycocotools.coco import COCO

    rep = report(coco_out)
    assert rep["complete"] and rep["summary"]["images"] == 6 and rep["classes"] == CLASSES.split(",")
    coco = COCO(str(coco_out / COCO_ANNOTATIONS.format(split="train")))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES.split(",")
    kept_images = [im for im in rep["images"] if im["kept"]]
    assert len(coco.getImgIds()) == len(kept_images) > 0
    kept_masks = [(im["index"] + 1, c) for im in kept_images for c in im["classes"] if c["decision"] == KEPT]
    assert len(coco.getAnnIds()) == len(kept_masks)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    for image_id, verdict in kept_masks:
        (ann,) = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if names[a["category_id"]] == verdict["name"]]
        mask = coco.annToMask(ann)
        info = coco.loadImgs([image_id])[0]
        image = np.asarray(Image.open(coco_out / COCO_IMAGES.format(split="train") / info["file_name"]))
        assert mask.shape == image.shape[:2] == (info["height"], info["width"])
        assert mask.sum() == ann["area"] == pytest.approx(verdict["area"] * mask.size, abs=0.5)
        assert ann["score"] == verdict["confidence"]
    with Image.open(coco_out / PREVIEW) as preview:
        assert preview.size[0] > 0
    two = [im for im in rep["images"] if len(im["classes"]) == 2]
    assert 0 < len(two) < 6  # mix: one- and two-object prompts


def expected_decision(verdict: dict, limits: Limits) -> str:
    """The decision quality control documents, from a mask's recorded measurements."""
    if verdict["area"] == 0:
        return EMPTY_MASK
    if verdict["area"] < limits.min_area:
        return TOO_SMALL
    if verdict["area"] > limits.max_area:
        return TOO_LARGE
    if verdict["confidence"] < limits.min_confidence:
        return LOW_CONFIDENCE
    if verdict["agreement"] < limits.min_agreement:
        return LOW_AGREEMENT
    return KEPT


def test_filters_drop_what_fails_and_semantic_maps_mark_it_ignored(head_run, coco_out, tmp_path):
    from pycocotools.coco import COCO

    base = report(coco_out)
    masks = [c for im in base["images"] for c in im["classes"]]
    shown = sorted((c for c in masks if c["area"] > 0), key=lambda c: c["area"])
    assert len(shown) >= 5 and all(c["agreement"] is not None for c in masks)  # the shapes world's exact masks are the teacher
    middle = shown[1:-1]
    confs = sorted(c["confidence"] for c in middle)
    limits = Limits(min_confidence=confs[1], min_agreement=min(c["agreement"] for c in middle if c["confidence"] >= confs[1]) + 1e-6,
                    min_area=shown[1]["area"], max_area=shown[-2]["area"])
    out = tmp_path / "sem"
    summary = ok(synth(head_run, out, "--classes", CLASSES, "--images-per-class", 2, "--objects", "mix", "--chunk-size", 3, "--batch", 3, "--format", "semantic",
                       "--min-confidence", limits.min_confidence, "--min-agreement", limits.min_agreement, "--min-area", limits.min_area, "--max-area", limits.max_area))
    rep = report(out)
    got = [c for im in rep["images"] for c in im["classes"]]
    measured = ("name", "confidence", "area", "agreement")
    assert [{k: c[k] for k in measured} for c in got] == [{k: c[k] for k in measured} for c in masks]  # same images, same head
    assert [c["decision"] for c in got] == [expected_decision(c, limits) for c in got]
    counts = rep["summary"]["masks"]
    assert min(counts[TOO_SMALL], counts[TOO_LARGE], counts[LOW_CONFIDENCE], counts[LOW_AGREEMENT], counts[KEPT]) >= 1
    assert summary["masks"] == counts and sum(counts.values()) == len(got)
    # the semantic export: kept images only; kept classes by id, dropped ones ignored (255)
    meta = read_semantic_classes(out)
    assert meta["classes"] == ["background", *CLASSES.split(",")] and len(meta["palette"]) == 4
    assert semantic_keys(out) == [im["key"] for im in rep["images"] if im["kept"]]
    assert rep["summary"]["images_kept"] == len(semantic_keys(out)) < len(rep["images"])
    ids = {name: i for i, name in enumerate(meta["classes"])}
    coco = COCO(str(coco_out / COCO_ANNOTATIONS.format(split="train")))  # unfiltered: every shown mask
    assert len(coco.getAnnIds()) == len(shown)
    for im in rep["images"]:
        if not im["kept"]:
            continue
        image, label = read_semantic_sample(out, "train", im["key"])
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        masks = {coco.loadCats([a["category_id"]])[0]["name"]: coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(imgIds=[im["index"] + 1]))}
        kept = [c["name"] for c in im["classes"] if c["decision"] == KEPT]
        dropped = [c["name"] for c in im["classes"] if c["decision"] != KEPT and c["name"] in masks]
        in_kept = np.any([masks[n] for n in kept], axis=0)
        in_dropped = np.any([masks[n] for n in dropped], axis=0) if dropped else np.zeros_like(in_kept)
        assert np.isin(label[in_kept], [ids[n] for n in kept]).all()  # kept classes claim their pixels
        assert (label[in_dropped & ~in_kept] == IGNORE_ID).all()  # pixels only a dropped class claims: ignored
        assert (label[~in_kept & ~in_dropped] == 0).all()  # the rest is background
        if len(kept) == 1:
            assert (label == ids[kept[0]]).sum() == masks[kept[0]].sum()


def test_shards_export_is_a_shard_set_iosd_train_reads(head_run, tmp_path):
    from iosd.train.checkpoint import read_checkpoint
    from iosd.train.shards import resolve_shards

    out = tmp_path / "shards"
    ok(synth(head_run, out, "--classes", "disc,star", "--images-per-class", 2, "--objects", "2", "--format", "shards"))
    shard_set = resolve_shards(str(out))
    assert shard_set.layout == read_checkpoint(head_run)[0]["layout"]
    samples = [s for url in shard_set.urls for s in iter_tar_samples(url)]
    rep = report(out)
    assert [s.key for s in samples] == [im["key"] for im in rep["images"] if im["kept"]]
    for s in samples:
        assert len(s.classes) == 2 and set(s.features) == {p for p, _ in shard_set.layout["layers"]}
        assert len(s.masks) == sum(c.decision == KEPT for c in s.classes) == sum(v["decision"] == KEPT for v in s.extra["qc"])
    trained = CliRunner().invoke(train_main, [str(out), "--steps", "1", "--out", str(tmp_path / "run2"), *QUICK_TRAIN])
    assert trained.exit_code == 0, trained.output


def test_judge_mask_measures_confidence_area_and_agreement():
    prob = np.zeros((10, 10), np.float32)
    prob[:5] = 0.8
    mask = prob > 0.5
    teacher = np.zeros((10, 10), bool)
    teacher[:4] = True
    v = judge_mask("disc", prob, mask, teacher, Limits())
    assert (v.confidence, v.area, v.agreement, v.decision) == (pytest.approx(0.8), 0.5, 0.8, KEPT)
    assert judge_mask("disc", prob, mask, teacher, Limits(min_agreement=0.9)).decision == LOW_AGREEMENT
    assert judge_mask("disc", prob, mask, None, Limits(min_agreement=0.9)).decision == KEPT  # no teacher mask: not judged
    assert judge_mask("disc", prob, mask, teacher, Limits(max_area=0.4)).decision == TOO_LARGE
    assert judge_mask("disc", prob, prob > 0.9, teacher, Limits()).decision == EMPTY_MASK


def test_an_interrupted_synth_resumes_to_the_same_files(head_run, coco_out, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(coco_out, out)
    # cut off while writing chunk 1: its record, the set-wide files and one image never written,
    # the others of it half-written
    (out / PARTS / "chunk-000001.json").unlink()
    for name in (REPORT, PREVIEW, COCO_ANNOTATIONS.format(split="train")):
        (out / name).unlink()
    images = out / COCO_IMAGES.format(split="train")
    cut = [im["key"] for im in report(coco_out)["images"] if im["index"] >= 3 and im["kept"]]
    assert cut
    (images / f"{cut[0]}.png").unlink()
    for key in cut[1:]:
        (images / f"{key}.png").write_bytes(b"\x89PNG half")
    first = (out / PARTS / "chunk-000000.json").stat().st_mtime_ns
    ok(synth(head_run, out, "--classes", CLASSES, "--images-per-class", 2, "--objects", "mix", "--chunk-size", 3, "--batch", 3))
    assert (out / PARTS / "chunk-000000.json").stat().st_mtime_ns == first  # the finished chunk was skipped
    for path in sorted(p.relative_to(coco_out) for p in coco_out.rglob("*") if p.is_file()):
        assert (out / path).read_bytes() == (coco_out / path).read_bytes(), path
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(p.relative_to(coco_out) for p in coco_out.rglob("*"))
    # a finished synth run again: nothing to do, same answer
    again = ok(synth(head_run, out, "--classes", CLASSES, "--images-per-class", 2, "--objects", "mix", "--chunk-size", 3, "--batch", 3))
    assert again["masks"] == report(coco_out)["summary"]["masks"]


@pytest.fixture(scope="module")
def diffusion_run(head_run, tmp_path_factory):
    """The same head, its checkpoint saying its shards came from diffusion (the tiny model) rather
    than the shapes world: same model and layout, so the head runs on generated images."""
    run = tmp_path_factory.mktemp("synth") / "diffusion-run"
    shutil.copytree(head_run, run)
    info = json.loads((run / CHECKPOINT_NAME).read_text())
    info["generation"]["source"] = "diffusion"
    (run / CHECKPOINT_NAME).write_text(json.dumps(info))
    return run


def test_any_class_name_with_tokens_works_with_a_diffusion_checkpoint(diffusion_run, tmp_path):
    out = tmp_path / "open"
    summary = ok(synth(diffusion_run, out, "--classes", "unicorn,lion dance,red envelope", "--images-per-class", 1, "--objects", "1", "--format", "semantic"))
    rep = report(out)
    assert summary["images"] == 3 and [im["prompt"] for im in rep["images"]] == [f"a photograph of a {c}" for c in ("unicorn", "lion dance", "red envelope")]
    assert all(c["agreement"] is None for im in rep["images"] for c in im["classes"])  # no teacher asked for
    assert rep["generation"]["source"] == "diffusion"


def test_class_names_from_a_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("unicorn\n\n# a comment\nlion dance\nred envelope, with a comma\n")
    assert read_class_names(str(path)) == ["unicorn", "lion dance", "red envelope, with a comma"]
    assert read_class_names(" unicorn , lion dance") == ["unicorn", "lion dance"]


def test_a_class_name_without_tokens_is_one_line_and_writes_nothing(diffusion_run, tmp_path):
    from iosd.errors import UserError

    out = tmp_path / "never"
    with pytest.raises(UserError, match="has no tokens"):
        Synthesizer(SynthConfig(checkpoint=str(diffusion_run), classes=["unicorn", "\t"], images_per_class=1, out=str(out), quiet=True)).run()
    assert not out.exists()


def _missing_model(run, tmp_path):
    broken = tmp_path / "broken-run"
    shutil.copytree(run, broken)
    info = json.loads((broken / CHECKPOINT_NAME).read_text())
    info["generation"]["model"] = str(tmp_path / "no-such-model")
    (broken / CHECKPOINT_NAME).write_text(json.dumps(info))
    return broken


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty name", "empty class name"),
        ("unknown format", "unknown --format"),
        ("missing checkpoint", "does not exist"),
        ("model not loadable", "no-such-model"),
        ("not a shapes class", "has no class 'unicorn'"),
        ("foreign out", "not an iosd-synth export"),
        ("other settings", "other settings (differs in: images_per_class)"),
        ("bad limit", "--min-confidence 2.0 is outside 0..1"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing_half_written(case, message, head_run, coco_out, tmp_path):
    run, out, args = head_run, tmp_path / "out", ["--classes", CLASSES, "--images-per-class", 1]
    if case == "empty name":
        args = ["--classes", "disc, ,star", "--images-per-class", 1]
    elif case == "unknown format":
        args += ["--format", "yolo"]
    elif case == "missing checkpoint":
        run = tmp_path / "nowhere"
    elif case == "model not loadable":
        run = _missing_model(head_run, tmp_path)
    elif case == "not a shapes class":
        args = ["--classes", "disc,unicorn", "--images-per-class", 1]
    elif case == "foreign out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "other settings":
        out = tmp_path / "copy"
        shutil.copytree(coco_out, out)
        args = ["--classes", CLASSES, "--images-per-class", 3, "--objects", "mix", "--chunk-size", 3, "--batch", 3]
    elif case == "bad limit":
        args += ["--min-confidence", 2.0]
    before = sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None
    result = synth(run, out, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert (sorted(p.relative_to(out) for p in out.rglob("*")) if out.exists() else None) == before
