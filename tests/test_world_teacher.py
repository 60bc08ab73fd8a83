"""The CPU world's trained Mask R-CNN teacher (train/world_teacher.py): deterministic and
resumable training, the shipped directory loaded through the teacher seam with the world's
class names, sha256-checked files, and COCOeval mask AP on held-out exact-mask scenes.

Runs are a few steps of a narrowed model: enough to exercise every path, not to learn."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from iosd.errors import UserError

pytestmark = [pytest.mark.teacher, pytest.mark.slow]
pytest.importorskip("mmdet")

STEPS = 4


def _cfg(**overrides):
    from iosd.train.world_teacher import TeacherConfig

    return TeacherConfig(**{"seed": 3, "steps": STEPS, "batch_size": 2, "warmup": 2, "save_every": 2, "width": 8, "fpn": 32, "fc": 64, **overrides})


def _train(root, name: str, **kwargs) -> dict:
    from iosd.train.world_teacher import train_teacher

    return train_teacher(_cfg(), root / name, root / f"work-{name}", show=False, log=lambda m: None, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted run: the reference the other runs must match, and the shipped directory."""
    root = tmp_path_factory.mktemp("teacher")
    record = _train(root, "straight")
    return root, record


def test_same_seed_same_weights(trained):
    root, record = trained
    again = _train(root, "again")
    assert again["sha256"]["weights.pth"] == record["sha256"]["weights.pth"]
    assert again["training"]["final_loss"] == record["training"]["final_loss"]
    assert set(record["sha256"]) == {"config.py", "weights.pth"}
    assert record["bytes"] < 5_000_000


def test_killed_and_resumed_equals_uninterrupted(trained):
    root, record = trained
    stopped = _train(root, "resumed", stop_after=STEPS // 2)
    assert stopped == {"steps": STEPS // 2, "stopped": True}
    assert not (root / "resumed").exists()  # nothing ships until the run is whole
    state = json.loads((root / "work-resumed" / "teacher" / "state.json").read_text())
    assert state["step"] == STEPS // 2
    resumed = _train(root, "resumed")
    assert resumed["sha256"]["weights.pth"] == record["sha256"]["weights.pth"]


def test_other_settings_in_the_same_work_dir_are_refused(trained):
    from iosd.train.world_teacher import train_teacher

    root, _ = trained
    with pytest.raises(UserError, match="other settings"):
        train_teacher(_cfg(lr=5e-4), root / "x", root / "work-straight", show=False, log=lambda m: None)


def _scene(names):
    from iosd.pipeline.shapes import render_scene
    from iosd.worlds import WORLD_SIDE

    return render_scene(names, np.random.default_rng(7), WORLD_SIDE, [0.1, 0.6][: len(names)])


def test_loads_through_the_seam_with_shape_names(trained):
    from iosd.pipeline.teachers import TeacherOptions, build_teacher
    from iosd.train.world_teacher import teacher_classes

    root, _ = trained
    teacher = build_teacher(TeacherOptions(name="mmdet", config=str(root / "straight" / "config.py"), score_thr=0.0))
    assert teacher.names == teacher_classes()
    assert teacher.describe()["label_names"] == "checkpoint" and teacher.describe()["missing_keys"] == 0
    image, _ = _scene(["disc", "star"])
    labels = teacher.label([image], [["disc", "star"]])
    assert len(labels) == 1 and len(labels[0]) == 2
    assert all(lab.mask.shape == image.shape[:2] and lab.mask.dtype == bool for lab in labels[0])
    with pytest.raises(UserError, match="'person'") as err:
        teacher.check_classes(["disc", "person"])
    assert "disc" in err.value.fix and "\n" not in err.value.line()


def test_named_form_finds_the_shipped_directory(trained, monkeypatch):
    import iosd.world_teachers as wt
    from iosd.pipeline.teacher import build_teacher, resolve_config

    root, _ = trained
    shipped = root / "shipped"
    shutil.copytree(root / "straight", shipped / "world-maskrcnn")
    monkeypatch.setattr(wt, "TEACHERS_DIR", shipped)
    assert resolve_config("world-maskrcnn") == shipped / "world-maskrcnn" / "config.py"
    teacher = build_teacher("world-maskrcnn")
    assert teacher.info["checkpoint"] == str(shipped / "world-maskrcnn" / "weights.pth")


@pytest.mark.parametrize("damage", ["altered", "missing", "extra"])
def test_damaged_directory_is_one_line(trained, tmp_path, damage):
    from iosd.pipeline.teacher import build_teacher

    root, _ = trained
    out = tmp_path / "t"
    shutil.copytree(root / "straight", out)
    if damage == "altered":
        with open(out / "weights.pth", "ab") as f:
            f.write(b"\0")
    elif damage == "missing":
        (out / "weights.pth").unlink()
    else:
        (out / "notes.txt").write_text("x")
    with pytest.raises(UserError) as err:
        build_teacher(str(out / "config.py"))
    line = err.value.line()
    assert "\n" not in line and "scripts/train-teacher.py" in line
    assert ("notes.txt" if damage == "extra" else "weights.pth") in line


def test_coco_eval_of_exact_masks_is_perfect():
    from iosd.evaluate.teacher_ap import coco_mask_ap
    from iosd.train.world_teacher import held_out_scenes, teacher_classes

    names = teacher_classes()
    scenes = held_out_scenes(1, 6, names)
    perfect = [{"masks": m, "labels": np.array([names.index(n) for n in ns]), "scores": np.ones(len(ns))} for _, m, ns in scenes]
    result = coco_mask_ap(scenes, perfect, names)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)
    wrong = [{**p, "labels": (p["labels"] + 1) % len(names)} for p in perfect]
    assert coco_mask_ap(scenes, wrong, names)["AP"] == pytest.approx(0.0)


def test_held_out_scenes_are_not_training_scenes():
    from iosd.train.world_teacher import held_out_scenes, teacher_classes, training_batch

    names = teacher_classes()
    held = held_out_scenes(0, 2, names)
    batch = training_batch(_cfg(seed=0), names, 0)
    assert held[0][0].shape == (64, 64, 3) and batch["inputs"][0].shape == (3, 128, 128)
    assert held_out_scenes(0, 2, names)[1][0].tobytes() == held[1][0].tobytes()


def test_coco_eval_runs_on_the_output(trained):
    from iosd.evaluate.teacher_ap import evaluate_teacher
    from iosd.pipeline.teacher import build_teacher

    root, _ = trained
    result = evaluate_teacher(build_teacher(str(root / "straight" / "config.py")), seed=1, count=4)
    assert {"AP", "AP50", "AP75", "per_class_AP"} <= set(result) and result["scenes"] == 4
    assert 0.0 <= result["AP"] <= 1.0


def test_the_shipped_teacher_matches_its_record_and_finds_shapes():
    """The shipped world-maskrcnn: every file as its record says, and a real detector: on 40
    held-out scenes its mask AP50 is far from chance (the record holds the 500-scene score)."""
    from iosd.evaluate.teacher_ap import evaluate_teacher
    from iosd.pipeline.teachers import TeacherOptions, build_teacher
    from iosd.world_teachers import teacher_dir, verify_teacher

    root = teacher_dir("world-maskrcnn")
    if not (root / "teacher.json").exists():
        pytest.skip("world-maskrcnn is not shipped (python scripts/train-teacher.py)")
    record = verify_teacher(root)
    assert record["script"] == "scripts/train-teacher.py" and record["config"]["seed"] == 0
    teacher = build_teacher(TeacherOptions(name="mmdet", config="world-maskrcnn", score_thr=0.05))
    scores = evaluate_teacher(teacher, seed=1, count=40)
    assert scores["AP50"] > 0.3, scores


def test_teacher_labels_on_rendered_scenes_filter_and_differ_from_exact_masks(tmp_path):
    """--labels teacher: the shapes world's own images, labelled by the shipped detector as
    generated images are (its masks, its scores, the --min-score filter), so a head can be
    trained on a real teacher's mistakes; the default (exact masks) keeps its identity."""
    from click.testing import CliRunner

    from iosd.manifest import read_manifest
    from iosd.pipeline.cli import main as gen_main
    from iosd.schema import iter_tar_samples
    from iosd.world_teachers import teacher_dir

    if not (teacher_dir("world-maskrcnn") / "teacher.json").exists():
        pytest.skip("world-maskrcnn is not shipped (python scripts/train-teacher.py)")
    base = ["--source", "shapes", "--classes", "shapes", "--model", "world-sdxl", "--num-samples", "6", "--shard-size", "6", "--quiet"]
    runs = {}
    for name, extra in (("exact", []), ("teacher", ["--labels", "teacher", "--teacher-config", "world-maskrcnn", "--min-score", "0.8"])):
        result = CliRunner().invoke(gen_main, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = (read_manifest(tmp_path / name), {s.seed: s for s in iter_tar_samples(str(tmp_path / name / "shard-000000.tar"), features=False)})
    exact, teacher = runs["exact"][0], runs["teacher"][0]
    assert "labels" not in exact["config"] and exact["teacher"]["kind"] == "exact"
    assert teacher["config"]["labels"] == "teacher" and teacher["teacher"]["config"] == "world-maskrcnn" and not teacher["teacher"]["random_weights"]
    assert teacher["config"]["min_score"] == 0.8 and teacher["identity"] != exact["identity"]
    kept = [r for s in runs["teacher"][1].values() for r in s.classes if r.decision == "kept"]
    assert kept and all(r.score >= 0.8 for r in kept)
    # the same seeds render the same scenes: where both kept a sample, the teacher's mask is its own
    shared = set(runs["exact"][1]) & set(runs["teacher"][1])
    assert shared and all(np.array_equal(runs["exact"][1][k].image, runs["teacher"][1][k].image) for k in shared)
    assert any(not np.array_equal(runs["exact"][1][k].masks, runs["teacher"][1][k].masks) for k in shared)
    # scripts/teacher-vs-exact.py pairs the two sets by seed and scores the teacher's masks
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "teacher-vs-exact.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "exact"), str(tmp_path / "teacher")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["scenes"] == len(shared) and report["masks_at_or_above"] == sum(r.decision == "kept" for k in shared for r in runs["teacher"][1][k].classes) and report["masks_below"] == 0
    assert 0.3 < report["mean_iou_at_or_above"] <= 1


def test_labels_teacher_needs_an_image_source(tmp_path):
    from click.testing import CliRunner

    from iosd.pipeline.cli import main as gen_main

    result = CliRunner().invoke(gen_main, ["--model", "tiny", "--labels", "teacher", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--labels teacher is for image sources" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
