"""What a trained teacher reads in a generator's samples (evaluate/sample_reads.py): the
recognisability score of a trained world, and its ceiling on the world's own rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest

from iosd.errors import UserError
from iosd.evaluate.sample_reads import summarise_reads, teacher_reads

NAMES = ["disc", "square", "star"]


def _pred(labels, scores):
    return {"labels": np.array(labels, int), "scores": np.array(scores, float), "masks": np.zeros((len(labels), 4, 4), bool)}


def test_a_sample_is_recognised_when_the_top_instance_has_the_prompted_class():
    preds = [_pred([1, 2], [0.9, 0.4]), _pred([0, 2], [0.3, 0.85]), _pred([], [])]
    reads = teacher_reads(preds, NAMES, ["square", "disc", "star"])
    assert [r["read"] for r in reads] == ["square", "star", None]
    assert [r["prompted_score"] for r in reads] == [0.9, 0.3, 0.0]
    summary = summarise_reads(reads)
    assert summary["recognised"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["prompted_class_found"] == pytest.approx(2 / 3, abs=1e-3)
    assert summary["at_0.8"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["median_top_score"] == pytest.approx(0.85)
    assert summary["recognised_per_class"] == {"square": 1.0, "disc": 0.0, "star": 0.0}


def test_bad_reads_are_one_line():
    with pytest.raises(UserError, match="does not label 'heart'"):
        teacher_reads([_pred([], [])], NAMES, ["heart"])
    with pytest.raises(UserError, match="2 predictions but 1"):
        teacher_reads([_pred([], []), _pred([], [])], NAMES, ["disc"])
    with pytest.raises(UserError, match="no samples"):
        summarise_reads([])


@pytest.mark.teacher
@pytest.mark.slow
def test_the_shipped_teacher_recognises_rendered_scenes_and_not_noise():
    """The ceiling is real (the shipped teacher names the world's own shapes far above the 1 in
    12 of chance) and the score can fail: on pure noise nothing is recognised."""
    pytest.importorskip("mmdet")
    from iosd.classes import load_split
    from iosd.evaluate.sample_reads import rendered_one_object
    from iosd.evaluate.teacher_ap import predict_instances
    from iosd.pipeline.teachers import TeacherOptions, build_teacher
    from iosd.world_teachers import teacher_dir

    if not (teacher_dir("world-maskrcnn") / "teacher.json").exists():
        pytest.skip("world-maskrcnn is not shipped (python scripts/train-teacher.py)")
    teacher = build_teacher(TeacherOptions(name="mmdet", config="world-maskrcnn", score_thr=0.05))
    names = list(load_split("shapes", 1).all)
    rendered = rendered_one_object(names, 2, seed=0, side=64)
    assert len(rendered) == 24 and {n for _, n in rendered} == set(names)
    ceiling = summarise_reads(teacher_reads(predict_instances(teacher, [im for im, _ in rendered]), teacher.names, [n for _, n in rendered]))
    assert ceiling["recognised"] >= 0.5, ceiling
    noise = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(12)]
    read = summarise_reads(teacher_reads(predict_instances(teacher, noise), teacher.names, names))
    assert read["recognised"] <= 0.25, read


@pytest.mark.teacher
@pytest.mark.slow
def test_world_preview_reads_its_samples(tmp_path):
    """scripts/world-preview.py --teacher: a grid, and JSON that holds the samples' reading beside
    the rendered scenes' ceiling (a few sampler steps: the machinery, not the score)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("mmdet")
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, str(root / "scripts/world-preview.py"), "--teacher", "world-maskrcnn", "--per-class", "1", "--pairs", "1", "--steps", "3", "--out", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["generated"]["samples"] == report["rendered"]["samples"] == 12
    assert 0 <= report["generated"]["recognised"] <= 1 and report["rendered"]["recognised"] >= 0.5
    assert out.stat().st_size > 0
    bad = subprocess.run([sys.executable, str(root / "scripts/world-preview.py"), "--teacher", "no-such-teacher", "--out", str(tmp_path / "x.png")], cwd=root, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists(), bad.stderr
    none = subprocess.run([sys.executable, str(root / "scripts/world-preview.py"), "--teacher", "world-maskrcnn", "--per-class", "0", "--out", str(tmp_path / "x.png")], cwd=root, capture_output=True, text=True, timeout=600)
    assert none.returncode == 2 and "--per-class" in none.stderr and not (tmp_path / "x.png").exists(), none.stderr
