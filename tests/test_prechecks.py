"""Checks that need no model fail before any model loads: exit code 2, one line, no load."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import make_tiny_run

from iosd.errors import UserError
from iosd.evaluate.cli import main as eval_main
from iosd.evaluate.predict_cli import main as predict_main
from iosd.pipeline.cli import main as gen_main
from iosd.pipeline.synth_cli import main as synth_main
from iosd.prechecks import check_class_names, check_layers_family, check_writable, stand_in_family
from iosd.train.checkpoint import CHECKPOINT_NAME


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A head trained a few steps on a small 64 px shapes-world set (made before any patching)."""
    return make_tiny_run(tmp_path_factory.mktemp("prechecks"), steps=2)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test."""
    import iosd.pipeline.generate as generate
    import iosd.pipeline.models as models

    def loaded(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(generate, "load_model", loaded)
    monkeypatch.setattr(generate, "load_configured", loaded)


def one_line(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert "model loaded" not in result.output and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


GEN = ["--model", "tiny", "--num-samples", "2", "--shard-size", "2", "--quiet"]


def test_gen_missing_teacher_checkpoint(no_model, tmp_path):
    result = CliRunner().invoke(gen_main, [*GEN, "--source", "diffusion", "--teacher-checkpoint", "/nonexistent.pth", "--out", str(tmp_path / "x")])
    one_line(result, "teacher checkpoint /nonexistent.pth does not exist")
    assert not (tmp_path / "x").exists()


def test_gen_output_below_a_file(no_model, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(gen_main, [*GEN, "--classes", "shapes", "--source", "shapes", "--out", str(tmp_path / "file" / "set")])
    one_line(result, "is a file, not a directory")


def test_gen_output_without_permission(no_model, tmp_path, monkeypatch):
    import iosd.prechecks as prechecks

    monkeypatch.setattr(prechecks.os, "access", lambda *a, **k: False)
    result = CliRunner().invoke(gen_main, [*GEN, "--classes", "shapes", "--source", "shapes", "--out", str(tmp_path / "set")])
    one_line(result, "no permission to write in")


def test_gen_layer_preset_of_the_other_family(no_model, tmp_path):
    result = CliRunner().invoke(gen_main, ["--model", "tiny-sd1", "--layers", "iosd", "--classes", "shapes", "--source", "shapes", "--out", str(tmp_path / "x")])
    one_line(result, "is a SD model")


def test_gen_class_file_name_without_tokens(no_model, tmp_path):
    classes = tmp_path / "mine.json"
    classes.write_text(json.dumps({"seen": ["cat", "!!"], "unseen": ["dog"]}))
    result = CliRunner().invoke(gen_main, [*GEN, "--classes", str(classes), "--out", str(tmp_path / "x")])
    one_line(result, "class name '!!' has no tokens")


@pytest.mark.parametrize(("classes", "message"), [("  ,!!", "empty class name"), ("cat,!!", "class name '!!' has no tokens")])
def test_synth_class_names(no_model, classes, message, tmp_path):
    result = CliRunner().invoke(synth_main, ["--checkpoint", str(tmp_path / "nowhere"), "--classes", classes, "--images-per-class", "1", "--out", str(tmp_path / "out"), "--quiet"])
    one_line(result, message)


def test_synth_output_below_a_file(no_model, run_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(synth_main, ["--checkpoint", str(run_dir), "--classes", "disc,star", "--images-per-class", "1", "--out", str(tmp_path / "file" / "out"), "--quiet"])
    one_line(result, "is a file, not a directory")


def test_synth_missing_teacher_checkpoint(no_model, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    info = json.loads((run / CHECKPOINT_NAME).read_text())
    info["generation"].update(source="diffusion", teacher_checkpoint="/nonexistent.pth")
    (run / CHECKPOINT_NAME).write_text(json.dumps(info))
    result = CliRunner().invoke(synth_main, ["--checkpoint", str(run), "--classes", "disc,star", "--images-per-class", "1", "--min-agreement", "0.5", "--out", str(tmp_path / "out"), "--quiet"])
    one_line(result, "teacher checkpoint /nonexistent.pth does not exist")


@pytest.mark.parametrize(("classes", "message"), [("cat,", "empty class name"), ("cat, ?", "class name '?' has no tokens")])
def test_predict_class_names(no_model, classes, message, tmp_path):
    result = CliRunner().invoke(predict_main, ["a photograph of a cat", "--checkpoint", str(tmp_path / "nowhere"), "--classes", classes, "--out", str(tmp_path / "p")])
    one_line(result, message)


def test_predict_output_below_a_file(no_model, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(predict_main, ["a photograph of a cat", "--checkpoint", str(tmp_path / "nowhere"), "--classes", "cat", "--out", str(tmp_path / "file" / "p")])
    one_line(result, "is a file, not a directory")


def test_eval_test_shards_below_a_file(no_model, run_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run_dir), "--images-per-class", "1", "--test-shards", str(tmp_path / "file" / "test"), "--report", str(tmp_path / "r"), "--quiet"])
    one_line(result, "cannot write to --test-shards")


def test_eval_missing_teacher_checkpoint(no_model, run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    info = json.loads((run / CHECKPOINT_NAME).read_text())
    info["generation"].update(source="diffusion", classes="shapes", teacher_checkpoint="/nonexistent.pth")
    (run / CHECKPOINT_NAME).write_text(json.dumps(info))
    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--images-per-class", "1", "--test-shards", str(tmp_path / "test"), "--report", str(tmp_path / "r"), "--quiet"])
    one_line(result, "teacher checkpoint /nonexistent.pth does not exist")


def test_the_rules_themselves(tmp_path):
    check_class_names(["cat", "lion dance", "3d printer", "  x "])
    for bad in ("", "  ", "!!", "\t,"):
        with pytest.raises(UserError, match="has no tokens"):
            check_class_names([bad])
    check_writable(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing created
    assert (stand_in_family("tiny"), stand_in_family("tiny-sd1"), stand_in_family("world-sdxl"), stand_in_family("world-sd1")) == ("sdxl", "sd", "sdxl", "sd")
    assert stand_in_family("stabilityai/sdxl-turbo") is None
    check_layers_family("iosd", "stabilityai/sd-turbo")  # unknown family: left to the load
    with pytest.raises(UserError, match="SDXL"):
        check_layers_family("gd", "tiny")
