"""It must learn: each paper head reaches held-out seen mIoU >= 0.8 on the CPU world.

The world is the one `make demo` uses (shapes source: exact masks, features from the re-noised
UNet pass of a tiny random-weight model of the real classes); the paper recipes' worlds are at 96 px instead of the tiny
models' 128 to halve the CPU time. The held-out set comes from the test seed stream, so no image
is shared with training. Each recipe runs with its own features, query, head and loss:

- ``fast``: the tiny SDXL at its 128 px, 3 compact maps, ``iosd-lite``, all options at their defaults.
- ``iosd``: the tiny SDXL, IOSD's 19 maps, first-token queries, the official Segmodule with
  widths scaled for CI (``SCALED``), BCE at the image's 96 px; batch 8, rate 1e-3, 1000 steps.
- ``gd``: the tiny SD v1, GD's 25 maps with both guidance halves, mean queries from the final
  layer, the official GD module with widths scaled for CI and patch 1 (its 64-side group is 24
  here, so patch 4 would leave 36 tokens for 256 at 512 px); batch 8, rate 1e-3, 1500 steps.
  Its bar is lower (``TARGETS``): the random SD v1's features bound it, not the module.
- ``gd-head``: GD's official module (widths scaled, patch 1) on the ``iosd`` case's world (the
  tiny SDXL's 19 maps, first-token queries), BCE at the image's size as both papers;
  batch 8, rate 1e-3, 1500 steps: the GD head's own ability to learn, held to 0.8.

The papers' schedules (12000 steps at batch 1; 5000 at batch 8) take GPU hours; their
architectures are exact on the real layouts (tests/test_paper_heads.py). This is the test that
fails when a head, the loss, the loader or the features stop carrying the signal.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.train.cli import main as train_main

TRAIN_SAMPLES = 800
HELD_OUT_PER_CLASS = 20
TARGET = 0.8
# The gd recipe end to end on the tiny SD v1: the random SD v1's features carry less of the
# shapes than the tiny SDXL's (a linear probe of foreground on each resolution group: 0.69 /
# 0.68 / 0.58 / 0.39 against the SDXL's 0.73 / 0.71 / 0.63), and GD's module plateaus there at
# 0.71-0.73 (1500-3000 steps, widths x1-x2, 800 or 1600 samples, queries made 8x more
# distinct). Its bar is what it reaches, less a margin; the head itself meets 0.8 on the
# tiny SDXL's features ("gd-head" below).
TARGETS = {"gd": 0.65}
WORLD_SIDE = 96  # pixels: the tiny models' default 128 costs twice the CPU time

# widths scaled for a 2-core CPU; the structure (levels, decoder layers, norms, dropout) is the papers'
SCALED = {
    "iosd": {"visual_channels": [8, 16, 32], "final_channels": 32, "d_model": 64, "heads": 4, "ffn": 128, "query_mlp_hidden": 128, "mask_mlp_hidden": 128},
    "gd": {"visual_channels": [4, 8, 16, 32], "d_model": 64, "heads": 4, "ffn": 128, "mask_mlp_hidden": 64, "patch": 1},
    # GD's module on the tiny SDXL's three resolution groups (one width each, twice the gd case's)
    "gd-head": {"visual_channels": [8, 16, 32], "d_model": 64, "heads": 4, "ffn": 128, "mask_mlp_hidden": 64, "patch": 1},
}
# case -> the recipe whose world it trains on (worlds are built once per module), model, options
CASES = {
    "gd": {"recipe": "gd", "model": "tiny-sd1", "train": ["--steps", "1500", "--lr", "1e-3"], "world": {"resolution": WORLD_SIDE}},
    "gd-head": {"recipe": "iosd", "model": "tiny", "train": ["--head", "gd", "--steps", "1500", "--batch-size", "8", "--lr", "1e-3"], "world": {"resolution": WORLD_SIDE}},
    "iosd": {"recipe": "iosd", "model": "tiny", "train": ["--steps", "1000", "--batch-size", "8", "--lr", "1e-3"], "world": {"resolution": WORLD_SIDE}},
    "fast": {"recipe": "fast", "model": "tiny", "train": [], "world": {}},  # the demo's world, at 128 px
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    made = {}

    def world(case: str):
        recipe = CASES[case]["recipe"]
        if recipe not in made:
            root = tmp_path_factory.mktemp(f"world-{recipe}")
            model, world_options = CASES[case]["model"], CASES[case]["world"]
            train = root / "shapes1"
            make_shapes_set(train, recipe=recipe, model=model, **world_options, num_samples=TRAIN_SAMPLES, shard_size=100, batch_size=16)
            held_out = root / "shapes1-test"
            make_shapes_set(held_out, recipe=recipe, model=model, **world_options, subset="all", stream="test", images_per_class=HELD_OUT_PER_CLASS, shard_size=80, batch_size=16)
            made[recipe] = train, held_out
        return made[recipe]

    return world


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_head_reaches_held_out_seen_miou(worlds, case, tmp_path, capsys):
    train, held_out = worlds(case)
    options = [f"--head-option={k}={json.dumps(v)}" for k, v in SCALED.get(case, {}).items()]
    started = time.perf_counter()
    args = [str(train), *CASES[case]["train"], *options, "--val", str(held_out), "--val-every", "100000", "--out", str(tmp_path / case), "--quiet", "--no-tensorboard"]
    result = CliRunner().invoke(train_main, args)
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["recipe"] == CASES[case]["recipe"]
    with capsys.disabled():  # the numbers belong in the CI log
        print(f"\n{case}: held-out seen mIoU {summary['val_seen_miou']:.3f}, unseen {summary['val_unseen_miou']:.3f}, {summary['step']} steps in {seconds:.0f} s")
    assert summary["val_seen_miou"] >= TARGETS.get(case, TARGET), summary


# ---------------------------------------------------------------------------------------
# The trained world (iosd/worlds.py): what only class semantics can give. Colour names no
# class there, so a head trained on the seen classes' masks finds an unseen class by name only
# through what the generator learned; DAAM reads the same generator's cross-attention.
# ---------------------------------------------------------------------------------------
WORLD_TRAIN = {"samples": 800, "steps": 600, "images_per_class": 10, "pairs_per_class": 6}
HEAD_OVER_DAAM = 0.15  # unseen mIoU points (fractions) by which the head must beat DAAM
UNSEEN_PAIR_FLOOR = 0.5  # per-class IoU of each unseen class on unseen+unseen prompts


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A `fast` head trained on the trained SDXL world's seen classes (one- and two-object prompts)."""
    from iosd.worlds import PROVENANCE, world_dir

    if not (world_dir("world-sdxl") / PROVENANCE).exists():
        pytest.fail("the trained world is missing: python scripts/train-world.py --world world-sdxl")
    root = tmp_path_factory.mktemp("trained-world")
    train = root / "shapes1"
    make_shapes_set(train, recipe="fast", model="world-sdxl", objects="mix", num_samples=WORLD_TRAIN["samples"], shard_size=100, batch_size=16)
    run = root / "run"
    result = CliRunner().invoke(train_main, [str(train), "--steps", str(WORLD_TRAIN["steps"]), "--out", str(run), "--quiet", "--no-tensorboard"])
    assert result.exit_code == 0, result.output
    return run


def _evaluate(run, objects: str, images: int, report) -> dict:
    from iosd.evaluate.cli import main as eval_main

    result = CliRunner().invoke(eval_main, ["--checkpoint", str(run), "--objects", objects, "--images-per-class", str(images), "--report", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads((report / "report.json").read_text())


@pytest.mark.slow
def test_trained_world_head_beats_daam_on_unseen_classes(world_run, tmp_path, capsys):
    report = _evaluate(world_run, "1", WORLD_TRAIN["images_per_class"], tmp_path / "one")
    head, daam = report["methods"]["head"], report["methods"]["daam"]
    with capsys.disabled():
        print(f"\ntrained world, one object: head {head['seen']['miou']:.3f} seen / {head['unseen']['miou']:.3f} unseen, DAAM {daam['seen']['miou']:.3f} / {daam['unseen']['miou']:.3f}")
    assert head["unseen"]["miou"] >= daam["unseen"]["miou"] + HEAD_OVER_DAAM, (head["unseen"], daam["unseen"])


# The target of issue 17, not yet met: with world-sdxl (seed 0, 2026-12-07) the head's per-class
# IoU on unseen+unseen prompts is 0.32-0.45 (heart 0.45, hexagon 0.45, star 0.32): it still marks
# both objects. Strict: the day it passes, the marker must go (and the README's claim change).
@pytest.mark.xfail(strict=True, reason="world-sdxl does not yet tell two unseen classes apart (docs/cpu-world.md)")
@pytest.mark.slow
def test_trained_world_tells_two_unseen_classes_apart(world_run, tmp_path, capsys):
    report = _evaluate(world_run, "2", WORLD_TRAIN["pairs_per_class"], tmp_path / "two")
    pairs = report["groups"]["unseen+unseen"]["head"]["per_class"]
    ious = {name: row["iou"] for name, row in pairs.items() if row["subset"] == "unseen"}
    with capsys.disabled():
        print(f"\ntrained world, unseen+unseen prompts: head IoU per class {ious}")
    assert ious and min(ious.values()) >= UNSEEN_PAIR_FLOOR, ious
