"""Shared fixtures: the embedded tiny SDXL and small shard sets generated once per session."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def tiny_loaded():
    from iosd.pipeline.models import load_model

    return load_model("tiny", device="cpu")


def make_shapes_set(out, **overrides) -> dict:
    """Generate a shapes-world shard set with the tiny model; returns the manifest."""
    from iosd.pipeline.generate import GenConfig, generate

    options = dict(classes="shapes", source="shapes", model="tiny", split=1, num_samples=12, shard_size=4, batch_size=4, seed=0, out=str(out), quiet=True, workers=2)
    options.update(overrides)
    manifest, _ = generate(GenConfig(**options))
    return manifest


@pytest.fixture(scope="session")
def shapes_set(tmp_path_factory):
    """12 seen-class samples in 3 shards (session-wide, read-only for tests)."""
    out = tmp_path_factory.mktemp("shapes") / "set"
    make_shapes_set(out)
    return out


# A small iosd-lite head: enough to exercise the commands that read a checkpoint, not to learn.
QUICK_TRAIN = ["--batch-size", "4", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=64", "--head-option", "ffn=128", "--head-option", "visual_channels=[32,32,32]"]


def make_tiny_run(root, steps: int):
    """A head trained ``steps`` steps on 8 samples of a 64 px shapes-world set under ``root``."""
    from click.testing import CliRunner

    from iosd.train.cli import main as train_main

    make_shapes_set(root / "set", resolution=64, num_samples=8, shard_size=4)
    run = root / "run"
    result = CliRunner().invoke(train_main, [str(root / "set"), "--steps", str(steps), "--out", str(run), *QUICK_TRAIN])
    assert result.exit_code == 0, result.output
    return run
