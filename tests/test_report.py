"""iosd-eval report files: JSON content, the papers' table layout, pictures, failures."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from iosd.errors import UserError
from iosd.evaluate.metrics import IoUAccumulator
from iosd.evaluate.report import (
    Example,
    build_report,
    print_table,
    render_markdown,
    safe_name,
    write_report,
)

SEEN, UNSEEN = ["cat", "potted plant"], ["bus"]
PROVENANCE = {"checkpoint": {"path": "runs/x/head.pt", "sha256": "ab" * 32}, "shards": {"dir": "shards/test", "sha256": ["cd" * 32]}}


def _results() -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for method, noise in (("head", 0.05), ("daam", 0.3)):
        acc = IoUAccumulator()
        for i in range(9):
            name = (SEEN + UNSEEN)[i % 3]
            target = rng.random((16, 16)) < 0.4
            acc.update(name, target ^ (rng.random((16, 16)) < noise), target)
        out[method] = acc.summary(SEEN, UNSEEN)
    return out


def _examples() -> dict:
    rng = np.random.default_rng(1)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    m = np.zeros((32, 32), bool)
    m[8:24, 8:24] = True
    both = Example(image, {"teacher": m, "head": m, "daam": np.zeros((8, 8), bool)}, {"head": 1.0, "daam": 0.0}, "a photograph of a cat")
    no_daam = Example(image, {"teacher": m, "head": m})
    return {"cat": [both, no_daam], "potted plant": [both]}


def test_write_report_files(tmp_path):
    results = _results()
    written = write_report(tmp_path / "rep", results, PROVENANCE, _examples())
    out = tmp_path / "rep"
    report = json.loads((out / "report.json").read_text())
    assert report["provenance"] == PROVENANCE
    assert set(report["methods"]) == {"head", "daam"}
    assert report["methods"]["head"] == json.loads(json.dumps(results["head"]))
    assert report["methods"]["head"]["seen"]["miou"] > report["methods"]["daam"]["seen"]["miou"]
    # pictures: 4 columns of 192 px, one row per example, under 14 px titles
    with Image.open(out / "grids" / "cat.png") as img:
        assert img.size == (4 * 192, 2 * (192 + 14))
    with Image.open(out / "grids" / "potted_plant.png") as img:
        assert img.size == (4 * 192, 192 + 14)
    assert (out / "per_class_iou.png").stat().st_size > 0
    assert sorted(p.name for p in written["grids"]) == ["cat.png", "potted_plant.png"]
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_markdown_is_laid_out_like_the_papers_tables():
    results = _results()
    md = render_markdown(build_report(results, PROVENANCE))
    lines = md.splitlines()
    header = lines.index("| Method | Seen | Unseen | Harmonic |")
    head = results["head"]
    assert lines[header + 1] == "|---|---:|---:|---:|"
    expected = f"| head | {100 * head['seen']['miou']:.2f} | {100 * head['unseen']['miou']:.2f} | {100 * head['harmonic_miou']:.2f} |"
    assert lines[header + 2] == expected
    assert lines[header + 3].startswith("| daam | ")
    per_class = lines.index("| Class | Split | Images | head | daam |")
    rows = [r.split(" | ")[0].lstrip("| ") for r in lines[per_class + 2 : per_class + 5]]
    assert rows == ["cat", "potted plant", "bus"]  # seen first, then unseen
    bus = lines[per_class + 4]
    assert bus == f"| bus | unseen | 3 | {100 * head['per_class']['bus']['iou']:.2f} | {100 * results['daam']['per_class']['bus']['iou']:.2f} |"
    assert "## Provenance" in md and "ab" * 32 in md


def test_classes_without_iou_are_shown_as_missing():
    acc = IoUAccumulator()
    acc.update("cat", np.ones((4, 4), bool), np.ones((4, 4), bool))
    md = render_markdown(build_report({"head": acc.summary(["cat", "dog"], ["bus"])}, {}))
    assert "| dog | seen | 0 | – |" in md
    assert "| head | 100.00 | – | – |" in md
    assert "left out of the means: bus, dog" in md


def test_print_table_shows_every_method():
    buf = io.StringIO()
    results = _results()
    print_table(results, console=Console(file=buf, width=120))
    text = buf.getvalue()
    assert "head" in text and "daam" in text
    assert f"{100 * results['head']['harmonic_miou']:.2f}" in text


def _group_results() -> dict:
    """GD's three two-object groups; each counts only the subsets its prompts draw from."""
    rng = np.random.default_rng(2)
    groups = {}
    for group, names, seen, unseen in (("seen+seen", SEEN, SEEN, []), ("seen+unseen", SEEN + UNSEEN, SEEN, UNSEEN), ("unseen+unseen", UNSEEN, [], UNSEEN)):
        groups[group] = {}
        for method, noise in (("head", 0.05), ("daam", 0.3)):
            acc = IoUAccumulator()
            for i in range(6):
                target = rng.random((16, 16)) < 0.4
                acc.update(names[i % len(names)], target ^ (rng.random((16, 16)) < noise), target)
            groups[group][method] = acc.summary(seen, unseen)
    return groups


def test_two_object_groups_are_laid_out_like_gd_table_1():
    groups = _group_results()
    report = build_report(_results(), PROVENANCE, groups)
    assert list(report["groups"]) == ["seen+seen", "seen+unseen", "unseen+unseen"]
    md = render_markdown(report).splitlines()
    header = md.index("| Method | Seen+Seen: Seen | Seen+Unseen: Seen | Seen+Unseen: Unseen | Seen+Unseen: Harmonic | Unseen+Unseen: Unseen |")
    su = groups["seen+unseen"]["head"]
    cells = [groups["seen+seen"]["head"]["seen"]["miou"], su["seen"]["miou"], su["unseen"]["miou"], su["harmonic_miou"], groups["unseen+unseen"]["head"]["unseen"]["miou"]]
    assert md[header + 2] == "| head | " + " | ".join(f"{100 * v:.2f}" for v in cells) + " |"
    assert "groups" not in build_report(_results(), PROVENANCE)  # one-object reports are unchanged
    buf = io.StringIO()
    print_table(_results(), console=Console(file=buf, width=160), groups=groups)
    assert "two-object prompts by group" in buf.getvalue() and f"{100 * su['harmonic_miou']:.2f}" in buf.getvalue()


def test_unwritable_report_directory_is_a_user_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_report(blocker, _results(), {})
    with pytest.raises(UserError, match="cannot create"):
        write_report(blocker / "sub", _results(), {})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores modes: emulate the refusal
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real(p, mode, **kw))
        with pytest.raises(UserError, match="no permission"):
            write_report(locked, _results(), {})
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_no_results_is_a_user_error():
    with pytest.raises(UserError, match="no results"):
        build_report({}, {})


def test_safe_names():
    assert safe_name("potted plant") == "potted_plant"
    assert safe_name("../etc") == "etc"
    assert safe_name("???") == "class"
