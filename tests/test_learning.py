"""It must learn: both heads, default options, reach held-out seen mIoU >= 0.8 on the CPU world.

The world is the one `make demo` uses (shapes source, tiny random-weight SDXL): exact masks,
features from the re-noised UNet pass. The held-out set comes from the test seed stream, so
no image is shared with training. This is the test that fails when a head, the loss, the
loader or the features stop carrying the signal.
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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    train = root / "shapes1"
    make_shapes_set(train, num_samples=TRAIN_SAMPLES, shard_size=100, batch_size=16)
    held_out = root / "shapes1-test"
    make_shapes_set(held_out, subset="all", stream="test", images_per_class=HELD_OUT_PER_CLASS, shard_size=80, batch_size=16)
    return train, held_out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["iosd", "gd"])
def test_head_reaches_held_out_seen_miou(world, head, tmp_path, capsys):
    train, held_out = world
    started = time.perf_counter()
    result = CliRunner().invoke(train_main, [str(train), "--head", head, "--val", str(held_out), "--out", str(tmp_path / head), "--quiet", "--no-tensorboard"])
    seconds = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    with capsys.disabled():  # the numbers belong in the CI log
        print(f"\n{head}: held-out seen mIoU {summary['val_seen_miou']:.3f}, unseen {summary['val_unseen_miou']:.3f}, {summary['step']} steps in {seconds:.0f} s")
    assert summary["val_seen_miou"] >= TARGET, summary
