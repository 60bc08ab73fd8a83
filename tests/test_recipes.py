"""Recipes: one definition, resolution with provenance, the papers' facts (layer groups on the
real UNet configs, first-token queries on the real CLIP BPE, ground-truth rules), --show-config
and the one-line refusals."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from iosd.errors import UserError
from iosd.layers import PRESETS, check_family, group_by_resolution
from iosd.pipeline.cli import main as gen_main
from iosd.pipeline.filter import judge
from iosd.pipeline.generate import GenConfig
from iosd.pipeline.teacher import MaskRCNNTeacher, class_mask
from iosd.pipeline.text import QuerySpec, coinciding_queries, query_tokens
from iosd.pipeline.tiny import clip_tokenizer
from iosd.recipes import CPU_STAND_INS, STAGES, get_recipe, recipe_names, resolve
from iosd.schema import KEPT, LOW_SCORE
from iosd.train.cli import main as train_main
from iosd.train.trainer import TrainConfig


def test_every_recipe_sets_the_same_options_and_each_is_a_real_option():
    names = recipe_names()
    assert {"iosd", "gd", "fast"} <= set(names)
    fields = {"gen": {f.name for f in dataclasses.fields(GenConfig)}, "train": {f.name for f in dataclasses.fields(TrainConfig)}, "eval": {"images_per_class", "gt_min_score", "threshold", "metric"}}
    for stage in STAGES:
        options = {name: set(get_recipe(name).settings[stage]) for name in names}
        assert len({frozenset(v) for v in options.values()}) == 1, options  # same options in every recipe
        assert options["iosd"] <= fields[stage], options["iosd"] - fields[stage]
        for name in names:
            assert all(s["source"] for s in get_recipe(name).settings[stage].values())  # every value says where it comes from


def test_user_values_win_and_are_recorded_as_overrides():
    resolved = resolve("iosd", "train", {"steps": 10, "lr": None}, classes="coco")
    assert resolved.values["steps"] == 10 and resolved.values["lr"] == 2e-5
    assert resolved.overrides == {"steps": 10}
    assert resolved.origin["lr"]["from"] == "recipe" and "official code" in resolved.origin["lr"]["source"]
    assert resolve("iosd", "train", {}, classes="pascal").values["steps"] == 3000  # the report: 3000 on PASCAL
    assert resolve("iosd", "train", {}, classes="coco").values["steps"] == 12000


def test_unknown_recipe_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        resolve("nope", "gen", {})
    result = CliRunner().invoke(gen_main, ["--recipe", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown recipe 'nope'" in result.output and "Traceback" not in result.output


def test_default_recipe_is_iosd_and_the_cpu_stand_ins_get_their_own():
    filled, resolved = GenConfig().with_recipe()
    assert resolved.recipe == "iosd" and filled.model == "stabilityai/sdxl-turbo" and filled.template == "A modern photograph of a {}"
    assert (filled.steps, filled.guidance, filled.resolution, filled.layers, filled.gt, filled.min_score) == (1, 0.0, 512, "iosd", "top", 0.8)
    assert (filled.query_template, filled.query_pooling, filled.query_hidden) == ("{}", "first", "penultimate")
    tiny, resolved = GenConfig(model="tiny").with_recipe()
    assert resolved.recipe == "fast" and tiny.resolution == 128 and tiny.layers == "compact"
    gd, _ = GenConfig(recipe="gd").with_recipe()
    assert (gd.model, gd.scheduler, gd.steps, gd.guidance, gd.halves, gd.objects, gd.query_pooling, gd.query_hidden) == ("CompVis/stable-diffusion-v1-4", "ddim", 50, 5.0, "both", "mix", "mean", "final")
    assert set(CPU_STAND_INS) == {"tiny", "tiny-sd1", "world-sdxl", "world-sd1"}
    world, resolved = GenConfig(model="world-sdxl").with_recipe()
    assert resolved.recipe == "fast" and world.resolution == 64  # the trained world's native side


def test_show_config_prints_every_setting_with_its_source():
    result = CliRunner().invoke(gen_main, ["--show-config", "--steps", "4"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "recipe iosd" in text and "A modern photograph of a {}" in text and "official code" in text
    assert "user (recipe: 1)" in text  # --steps 4 overrides the recipe's single step


def test_show_config_of_a_training_run_follows_the_shards_recipe(shapes_set):
    result = CliRunner().invoke(train_main, [str(shapes_set), "--show-config", "--lr", "0.001"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "recipe fast" in text and "iosd-lite" in text and "user (recipe: 0.0001)" in text


def test_a_recipe_of_another_layout_than_the_shards_is_refused(shapes_set, tmp_path):
    result = CliRunner().invoke(train_main, [str(shapes_set), "--recipe", "iosd", "--out", str(tmp_path / "run")])
    assert result.exit_code != 0 and "recipe 'iosd' needs its 19 maps" in result.output and "Traceback" not in result.output


def test_manifest_records_the_recipe(shapes_set):
    manifest = json.loads((shapes_set / "dataset.json").read_text())
    assert manifest["recipe"]["name"] == "fast" and manifest["recipe"]["settings"]["layers"]["value"] == "compact"
    assert manifest["embedding"]["pooling"] == "mean"


# -- the papers' facts --------------------------------------------------------------------------
def _groups(shapes: dict[str, list[int]]) -> list[tuple[int, int]]:
    """(side, channels) per resolution group."""
    return [(shapes[g[0]][-1], sum(shapes[p][0] for p in g)) for g in group_by_resolution(shapes)]


def test_iosd_layers_give_the_official_channel_groups_on_sdxl():
    from iosd.pipeline.capture import sdxl_layer_shapes

    layers = PRESETS["iosd"].layers
    assert len(layers) == 19
    assert _groups(sdxl_layer_shapes(layers)) == [(16, 7040), (32, 4160), (64, 2560)]


def test_an_sd1_model_under_the_sdxl_recipe_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(gen_main, ["--model", "tiny-sd1", "--recipe", "iosd", "--classes", "shapes", "--source", "shapes", "--num-samples", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "names SDXL UNet modules, but tiny-sd1 is a SD model" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x" / "dataset.json").exists()


def test_sd_presets_are_refused_on_sdxl_and_back():
    with pytest.raises(UserError, match="names SD UNet modules"):
        check_family("gd", "sdxl", "stabilityai/sdxl-turbo")
    with pytest.raises(UserError, match="use --layers gd"):
        check_family("iosd", "sd", "CompVis/stable-diffusion-v1-4")
    check_family("a.b,c.d", "sd", "any")  # explicit paths are the user's business


def test_first_token_query_on_the_real_clip_bpe():
    tok = clip_tokenizer()
    spec = QuerySpec("{}", "first")
    (start, end), = query_tokens(tok, ["hot dog"], spec)
    ids = tok("hot dog").input_ids
    assert (start, end) == (1, 2) and tok.convert_ids_to_tokens(ids[start]) == "hot</w>"
    assert query_tokens(tok, ["hot dog"], QuerySpec("a photograph of a {}", "mean")) == [(5, 7)]


def test_first_token_queries_cannot_tell_a_shared_first_word_apart(tiny_loaded):
    from iosd.classes import load_split
    from iosd.pipeline.text import class_embeddings

    emb = class_embeddings(tiny_loaded.pipe, ["hot dog", "hot", "dog"], QuerySpec("{}", "first"))
    assert np.allclose(emb[0], emb[1], atol=1e-5)  # CLIP is causal: token 1 sees only "hot"
    assert not np.allclose(emb[0], emb[2])
    coco = list(load_split("coco", 1).all)
    groups = coinciding_queries(tok := clip_tokenizer(), coco)
    assert ["baseball bat", "baseball glove"] in groups and tok is not None


def _instances(scores: list[float], labels: list[int], masks: list[np.ndarray]):
    return SimpleNamespace(scores=torch.tensor(scores), labels=torch.tensor(labels), masks=torch.from_numpy(np.stack(masks)))


def test_ground_truth_rules_on_synthetic_detector_output():
    a, b, c = (np.zeros((4, 4), bool) for _ in range(3))
    a[0], b[1], c[2] = True, True, True
    inst = _instances([0.7, 0.95, 0.9], [1, 1, 0], [a, b, c])
    teacher = MaskRCNNTeacher(None, None, ["person", "cat"], {"score_thr": 0.05, "gt": "top"})
    (top,) = teacher._per_class(inst, (4, 4), ["cat"])
    assert top.score == pytest.approx(0.95) and (top.mask == b).all()  # the top instance only
    teacher.gt = "union"
    (union,) = teacher._per_class(inst, (4, 4), ["cat"])
    assert union.score == pytest.approx(0.95) and (union.mask == (a | b)).all()
    mask, score = class_mask(torch.from_numpy(np.stack([a])), torch.tensor([0.5]), "top")
    assert score == 0.5 and (mask == a).all()
    # IOSD: a top instance under 0.8 is not ground truth (the sample is skipped)
    records, kept = judge(["cat"], [mask], [score], {}, min_score=0.8)
    assert records[0].decision == LOW_SCORE and kept.shape[0] == 0
    records, _ = judge(["cat"], [top.mask], [top.score], {}, min_score=0.8)
    assert records[0].decision == KEPT
