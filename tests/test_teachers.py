"""The teacher seam: every text-prompted teacher on tiny random-weight configs of its real
classes (built offline, no hub), bad input refused in one line, any vocabulary end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from iosd.choices import BASELINE_NAMES, TEACHER_NAMES, TEXT_TEACHERS
from iosd.errors import UserError
from iosd.pipeline.teachers import (
    BUILDERS,
    TeacherOptions,
    build_teacher,
    check_teacher_choice,
    check_teacher_models,
    teacher_spec,
    threshold_defaults,
)

_BUILT: dict[str, object] = {}


def tiny(name: str):
    """One tiny teacher per name for the whole module (building is the slow part)."""
    if name not in _BUILT:
        _BUILT[name] = build_teacher(TeacherOptions(name=name, tiny=True, score_thr=0.0))
    return _BUILT[name]


def images(n: int = 2, side: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


def test_registry_names_every_teacher_with_real_models_and_sourced_thresholds():
    assert tuple(BUILDERS) == TEACHER_NAMES and set(TEXT_TEACHERS) < set(BASELINE_NAMES)
    for name in TEXT_TEACHERS:
        spec = teacher_spec(name)
        assert spec["text_prompted"] and spec["models"]
        assert all("/" in m["id"] and m["revision"] for m in spec["models"].values())
        defaults = threshold_defaults(name)
        assert {"score_thr", "mask_thr", "min_score"} <= set(defaults)
        assert all(0 <= d["value"] <= 1 and d["source"] for d in defaults.values())
    assert teacher_spec("sam3")["models"]["segmenter"]["id"] == "facebook/sam3"
    assert threshold_defaults("mmdet") == {}


@pytest.mark.parametrize("name", TEXT_TEACHERS)
def test_tiny_teacher_labels_any_class_name(name):
    teacher = tiny(name)
    labels = teacher.label(images(), [["zorblat", "traffic light"], ["lion dance"]])
    assert [len(row) for row in labels] == [2, 1]
    for row in labels:
        for lab in row:
            assert lab.mask.shape == (96, 96) and lab.mask.dtype == bool
            assert isinstance(lab.score, float) and 0.0 <= lab.score <= 1.0
    assert any(lab.mask.any() for row in labels for lab in row)  # score_thr 0: random weights still find something
    info = teacher.describe()
    assert info["name"] == name and info["random_weights"] is True
    assert info["score_thr"] == 0.0 and "mask_thr" in info and info["gt"] == "top"
    assert [m["role"] for m in info["models"]] == list(teacher_spec(name)["models"])
    assert teacher.knows("anything at all") and teacher.label([], []) == []


def test_tiny_teacher_is_deterministic_and_synonyms_add_prompts():
    a = build_teacher(TeacherOptions(name="sam3", tiny=True, score_thr=0.0, synonyms={"zorblat": ["glowing orb"]}))
    assert a.prompts("zorblat") == ["zorblat", "glowing orb"] and a.prompts("dining_table") == ["dining table"]
    first = a.label(images(1), [["zorblat"]])[0][0]
    again = tiny("sam3").label(images(1), [["zorblat"]])[0][0]  # same weights, one prompt fewer
    b = build_teacher(TeacherOptions(name="sam3", tiny=True, score_thr=0.0, synonyms={"zorblat": ["glowing orb"]}))
    assert np.array_equal(first.mask, b.label(images(1), [["zorblat"]])[0][0].mask)
    assert first.score >= again.score  # the synonym's instances join the name's


@pytest.mark.parametrize("name", TEXT_TEACHERS)
def test_bad_input_is_one_line_before_any_work(name):
    teacher = tiny(name)
    mixed = [images(1, 96)[0], images(1, 64)[0]]
    with pytest.raises(UserError, match="mixed sizes .*64x64, 96x96"):
        teacher.label(mixed, [["cat"], ["cat"]])
    with pytest.raises(UserError, match="no tokens"):
        teacher.label(images(1), [["?!"]])
    with pytest.raises(UserError, match="uint8 HxWx3"):
        teacher.label([np.zeros((8, 8), np.uint8)], [["cat"]])


def test_missing_model_files_are_one_line(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="does not exist"):
        check_teacher_models("sam3", str(missing))
    model = tmp_path / "sam3"
    model.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        check_teacher_models("sam3", str(model))
    (model / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weights"):
        check_teacher_models("sam3", str(model))
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no tokenizer files"):
        check_teacher_models("sam3", str(model))
    (model / "tokenizer.json").write_text("{}")
    check_teacher_models("sam3", str(model))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match="not in the hub cache"):
        check_teacher_models("owlv2+sam", None)


def test_teacher_options_must_fit_the_teacher():
    with pytest.raises(UserError, match="unknown teacher"):
        check_teacher_choice("yolo", None, None, None)
    with pytest.raises(UserError, match="mmdet's"):
        check_teacher_choice("sam3", "mask-rcnn_r50_fpn_1x_coco", None, None)
    with pytest.raises(UserError, match="not mmdet"):
        check_teacher_choice(None, None, None, "facebook/sam3")
    with pytest.raises(UserError, match="names 1 models but the owlv2\\+sam teacher has 2"):
        check_teacher_choice("owlv2+sam", None, None, "google/owlv2-base-patch16-ensemble")
    check_teacher_choice("owlv2+sam", None, None, "a/b,c/d")


def test_split_file_synonyms(tmp_path):
    from iosd.classes import prompt_synonyms

    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"seen": ["zorblat"], "unseen": ["unicorn"], "synonyms": {"zorblat": ["glowing orb"]}}))
    assert prompt_synonyms(str(good)) == {"zorblat": ["glowing orb"]}
    assert prompt_synonyms("pascal")["aeroplane"] == ["airplane"] and prompt_synonyms("coco") == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"seen": ["zorblat"], "synonyms": {"unicorn": ["horse"]}}))
    with pytest.raises(UserError, match="does not list"):
        prompt_synonyms(str(bad))


def test_genconfig_keeps_mmdet_identity_and_takes_the_teachers_defaults():
    from iosd.pipeline.generate import GenConfig

    base = dict(model="tiny", classes="coco", out="/tmp/iosd-unused")
    mmdet = GenConfig(**base)
    assert "teacher" not in mmdet.identity() and "teacher_model" not in mmdet.identity()
    filled, resolved = GenConfig(**{**base, "model": None}, teacher="sam3").with_recipe()
    assert filled.score_thr == 0.5 and filled.min_score == 0.5 and filled.mask_thr == 0.5
    assert resolved.origin["score_thr"]["source"].startswith("teacher sam3: facebook/sam3")
    given, _ = GenConfig(**{**base, "model": None}, teacher="sam3", min_score=0.7).with_recipe()
    assert given.min_score == 0.7
    tiny_filled, _ = GenConfig(**base, teacher="sam3").with_recipe()
    assert tiny_filled.score_thr == 0.0 and tiny_filled.min_score == 0.0  # random weights: no confidence
    assert GenConfig(**base, teacher="sam3").identity()["teacher"] == "sam3"


def test_gen_with_a_text_teacher_labels_classes_coco_lacks(tmp_path):
    from iosd.manifest import read_manifest
    from iosd.pipeline.cli import main as gen_main
    from iosd.schema import iter_tar_samples

    classes = tmp_path / "mine.json"
    classes.write_text(json.dumps({"seen": ["zorblat", "lion dance"], "unseen": ["unicorn"], "synonyms": {"zorblat": ["glowing orb"]}}))
    out = tmp_path / "set"
    args = ["--model", "tiny", "--teacher", "sam3", "--classes", str(classes), "--num-samples", "2", "--shard-size", "2", "--batch-size", "2", "--out", str(out), "--quiet", "--workers", "1"]
    result = CliRunner().invoke(gen_main, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["config"]["teacher"] == "sam3"
    teacher = manifest["teacher"]
    assert teacher["name"] == "sam3" and teacher["models"][0]["role"] == "segmenter" and teacher["synonyms"] == {"zorblat": ["glowing orb"]}
    assert {"score_thr", "mask_thr", "gt", "sources"} <= set(teacher)
    names = {c.name for s in iter_tar_samples(str(out / "shard-000000.tar")) for c in s.classes}
    assert names <= {"zorblat", "lion dance"}
    # the mmdet teacher still refuses what COCO lacks, now pointing at the text teachers
    refused = CliRunner().invoke(gen_main, ["--model", "tiny", "--teacher", "sam3", "--teacher-config", "x.py", "--classes", str(classes), "--out", str(tmp_path / "o")])
    assert refused.exit_code == 2 and "mmdet's" in refused.output


def test_eval_baselines_are_checked_before_any_work():
    from iosd.evaluate.cli import parse_baselines

    assert parse_baselines("daam,sam3, sam3") == ["daam", "sam3"] and parse_baselines("none") == []
    with pytest.raises(UserError, match="unknown --baselines 'sam4'"):
        parse_baselines("daam,sam4")


def test_grounding_dino_prompts_find_each_class_span():
    teacher = tiny("grounding-dino+sam2")
    from iosd.pipeline.teachers.base import Query

    queries = [Query(0, 0, "traffic light"), Query(0, 1, "cat"), Query(1, 0, "Dog")]
    ids, spans = teacher._text([[0, 1], [2]], queries)
    tokens = teacher.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    assert tokens[0] == "[CLS]" and "".join(t.removeprefix("##") for t in tokens[spans[0][0] : spans[0][1]]) == "trafficlight"
    assert tokens[spans[0][1]] == "." and "".join(t.removeprefix("##") for t in tokens[spans[1][0] : spans[1][1]]) == "cat"
    assert teacher.tokenizer.convert_ids_to_tokens(ids[1].tolist())[spans[2][0]] == "d"  # lower-cased, as the model card


def test_eval_reports_a_text_prompted_baseline_beside_head_and_daam(tmp_path):
    from conftest import make_shapes_set

    from iosd.evaluate.cli import main as eval_main
    from iosd.train.cli import main as train_main

    shards = tmp_path / "shapes1"
    make_shapes_set(shards, num_samples=8, shard_size=8)
    run = tmp_path / "run"
    trained = CliRunner().invoke(train_main, [str(shards), "--steps", "2", "--batch-size", "4", "--out", str(run), "--workers", "0", "--quiet"])
    assert trained.exit_code == 0, trained.output
    report = tmp_path / "report"
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--images-per-class", "1", "--baselines", "daam,sam3", "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((report / "report.json").read_text())
    assert set(data["methods"]) == {"head", "daam", "sam3"}
    sam3 = data["methods"]["sam3"]
    assert sam3["seen"]["classes"] + len(sam3["seen"]["missing"]) == 9 and sam3["unseen"]["classes"] + len(sam3["unseen"]["missing"]) == 3
    assert data["provenance"]["baselines"]["sam3"]["name"] == "sam3" and "| sam3 " in (report / "report.md").read_text()
    assert "sam3" in result.output  # the terminal table shows it beside head and DAAM
