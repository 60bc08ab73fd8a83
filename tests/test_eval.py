"""iosd-eval and iosd-predict end to end on the CPU world (tiny model, shapes)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.classes import load_split
from iosd.evaluate.cli import main as eval_main
from iosd.evaluate.predict_cli import main as predict_main
from iosd.pipeline.generate import GenConfig, Plan
from iosd.schema import iter_tar_samples
from iosd.train.cli import main as train_main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A briefly trained iosd head on a small shapes set (enough to exercise the machinery)."""
    root = tmp_path_factory.mktemp("evalrun")
    shards = root / "shapes1"
    make_shapes_set(shards, num_samples=16, shard_size=8)
    run = root / "run"
    result = CliRunner().invoke(train_main, [str(shards), "--steps", "4", "--batch-size", "4", "--out", str(run), "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    return run


def test_eval_builds_test_shards_and_reports_head_and_daam(run_dir, tmp_path):
    report = tmp_path / "report"
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--images-per-class", "2", "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((report / "report.json").read_text())
    test_dir = run_dir.parent / "shapes1-test"
    manifest = json.loads((test_dir / "dataset.json").read_text())
    assert manifest["config"]["stream"] == "test" and manifest["counts"]["written"] == 2 * 12
    assert manifest["subset"] == "all"
    results = data["methods"]
    assert set(results) == {"head", "daam"}
    for method in results.values():
        assert method["seen"]["classes"] + len(method["seen"]["missing"]) == 9
        assert method["unseen"]["classes"] + len(method["unseen"]["missing"]) == 3
    assert (report / "report.md").exists() and list((report / "grids").glob("*.png"))
    # a second run reuses the cached test shards (no diffusion): same numbers
    again = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--images-per-class", "2", "--report", str(tmp_path / "r2"), "--quiet"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["methods"] == results
    assert data["provenance"]["protocol"]["images_per_class"] == 2
    # ... and never passes it off as a test set of another size
    other = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--images-per-class", "3", "--quiet"])
    assert other.exit_code == 2 and "holds 2 images per class, not --images-per-class 3" in other.output
    # the grid examples carry each method's IoU against the teacher, as computed from their masks
    from iosd.evaluate.metrics import mask_iou
    from iosd.evaluate.scoring import score
    from iosd.train.checkpoint import load_head

    head, info = load_head(run_dir)
    scores = score(head, test_dir, [s["name"] for s in manifest["shards"]], [p for p, _ in info["layout"]["layers"]], gt_min_score=0.8, workers=0)
    examples = [ex for shown in scores.examples.values() for ex in shown]
    assert examples and all(set(ex.ious) <= {"head", "daam"} for ex in examples)
    for ex in examples:
        for column, iou in ex.ious.items():
            assert iou == mask_iou(ex.masks[column], ex.masks["teacher"])


GROUP_OF = {0: "seen+seen", 1: "seen+unseen", 2: "unseen+unseen"}  # by the number of unseen classes


def test_two_object_plan_is_fixed_grouped_and_leaves_one_object_plans_alone():
    split = load_split("coco", 1)
    cfg = GenConfig(classes="coco", model="tiny", subset="all", objects="2", stream="test", images_per_class=3, shard_size=50).resolved()
    plan, again = Plan(cfg, split), Plan(cfg, split)
    cands = [plan.candidate(i // 50, i % 50) for i in range(plan.total)]
    assert [(c.prompt, c.group, c.seed) for c in cands] == [(c.prompt, c.group, c.seed) for c in (again.candidate(i // 50, i % 50) for i in range(again.total))]
    assert Counter(c.group for c in cands) == {"seen+seen": 3 * len(split.seen), "seen+unseen": 3 * len(split.unseen), "unseen+unseen": 3 * len(split.unseen)}
    for c in cands:
        assert len(set(c.names)) == 2 and c.group == GROUP_OF[sum(n in split.unseen for n in c.names)]
    assert len({tuple(c.names) for c in cands}) > len(split.all)  # partners are drawn, in both orders
    one = Plan(GenConfig(classes="coco", model="tiny", subset="all", stream="test", images_per_class=3).resolved(), split)
    assert one.groups is None and one.fixed == [c for c in split.all for _ in range(3)]


def test_eval_two_objects_scores_gd_groups(run_dir, tmp_path):
    args = ["--checkpoint", str(run_dir), "--objects", "2", "--images-per-class", "2", "--quiet"]
    result = CliRunner().invoke(eval_main, [*args, "--report", str(tmp_path / "r1")])
    assert result.exit_code == 0, result.output
    test_dir = run_dir.parent / "shapes1-test2"
    manifest = json.loads((test_dir / "dataset.json").read_text())
    assert manifest["config"]["objects"] == "2" and manifest["counts"]["written"] == 2 * (9 + 3 + 3)
    unseen = set(manifest["classes"]["unseen"])
    groups = Counter()
    for shard in manifest["shards"]:
        for sample in iter_tar_samples(str(test_dir / shard["name"]), features=False):
            names = [c.name for c in sample.classes]
            assert len(set(names)) == 2 and sample.prompt == "a photograph of a {} and a {}".format(*names)
            assert sample.extra["group"] == GROUP_OF[sum(n in unseen for n in names)]
            groups[sample.extra["group"]] += 1
    assert groups == {"seen+seen": 18, "seen+unseen": 6, "unseen+unseen": 6}
    data = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert set(data["methods"]) == {"head", "daam"} and list(data["groups"]) == list(GROUP_OF.values())
    for group, per in data["groups"].items():
        assert set(per) == {"head", "daam"}
        for s in per.values():
            assert {"seen", "unseen", "harmonic_miou", "harmonic_pooled_iou"} <= set(s)
            assert s["seen"]["classes"] + len(s["seen"]["missing"]) == (0 if group == "unseen+unseen" else 9)
            assert s["unseen"]["classes"] + len(s["unseen"]["missing"]) == (0 if group == "seen+seen" else 3)
    assert "Seen+Unseen: Harmonic" in (tmp_path / "r1" / "report.md").read_text()
    # a second run reuses the cached two-object shards: same manifest, same numbers
    again = CliRunner().invoke(eval_main, [*args, "--report", str(tmp_path / "r2")])
    assert again.exit_code == 0, again.output
    data2 = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert data2["groups"] == data["groups"] and data2["provenance"]["test_shards"] == data["provenance"]["test_shards"]
    # the two-object set is no one-object test set
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--test-shards", str(test_dir), "--quiet"])
    assert result.exit_code == 2 and "holds 2-object test prompts, not --objects 1" in result.output


def test_eval_refuses_another_split_or_layout(run_dir, tmp_path):
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--split", "2", "--quiet"])
    assert result.exit_code == 2 and "trained on shapes split 1" in result.output
    other = tmp_path / "other"
    make_shapes_set(other, num_samples=4, shard_size=4, layers="mid_block", subset="all", stream="test", images_per_class=None)
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--test-shards", str(other), "--quiet"])
    assert result.exit_code == 2 and "does not match the checkpoint's features" in result.output


def test_eval_without_any_run_says_what_to_do(tmp_path):
    result = CliRunner().invoke(eval_main, ["--runs", str(tmp_path / "none"), "--quiet"])
    assert result.exit_code == 2 and "iosd-train" in result.output


def test_predict_writes_image_masks_and_overlay(run_dir, tmp_path):
    out = tmp_path / "pred"
    result = CliRunner().invoke(predict_main, ["--checkpoint", str(run_dir), "a photograph of a star and a ring", "--classes", "star,ring", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("image.png", "mask-star.png", "mask-ring.png", "overlay.png", "prediction.json"):
        assert (out / name).exists(), name
    # an existing image, through the re-noised UNet pass; a class not in the prompt is noted
    image = out / "image.png"
    shutil.copy(image, tmp_path / "mine.png")
    result = CliRunner().invoke(predict_main, ["--checkpoint", str(run_dir), "a photograph of a star", "--classes", "star,unicorn", "--image", str(tmp_path / "mine.png"), "--out", str(tmp_path / "p2")])
    assert result.exit_code == 0, result.output
    assert "'unicorn' is not in the prompt" in result.output
    result = CliRunner().invoke(predict_main, ["--checkpoint", str(run_dir), "a photograph of a star", "--classes", "star,", "--out", str(tmp_path / "p3")])
    assert result.exit_code == 2 and "empty class name" in result.output
