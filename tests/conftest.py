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
