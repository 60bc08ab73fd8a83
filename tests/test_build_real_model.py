"""scripts/build-real-model.py: the real architectures' configs, and a tiny build that
iosd loads as a local model directory and generates with; atomic writes, one-line errors."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build-real-model.py"

# The published models' parameter counts (their safetensors), which the real configs must give.
REAL_PARAMETERS = {
    "sdxl": {"unet": 2_567_463_684, "text_encoder_2": 694_659_840, "text_encoder": 123_060_480, "vae": 83_653_863},
    "sd1": {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863},
}


@pytest.fixture(scope="module")
def brm():
    """The script as a module (its file name has dashes)."""
    spec = importlib.util.spec_from_file_location("build_real_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["sdxl", "sd1"])
def test_real_configs_have_the_published_parameter_counts(brm, family):
    assert brm.parameter_counts(brm.spec_of(family)) == REAL_PARAMETERS[family]


def test_real_sdxl_configs_are_sdxl_turbos(brm):
    spec = brm.spec_of("sdxl")
    assert spec.vae["scaling_factor"] == 0.13025 and spec.vae["force_upcast"]
    assert [(t["hidden_size"], t["num_hidden_layers"]) for t in spec.text] == [(768, 12), (1280, 32)]
    assert spec.text[1]["projection_dim"] == 1280
    assert brm.spec_of("sd1").vae["scaling_factor"] == 0.18215


def _modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_tiny_sdxl_builds_loads_and_generates(brm, tmp_path):
    from iosd.layers import resolve_layers
    from iosd.pipeline.capture import FeatureCapture
    from iosd.pipeline.models import load_model
    from iosd.pipeline.sources import diffuse

    out = tmp_path / "sdxl"
    old = os.umask(0o022)
    try:
        summary = brm.build("sdxl", out, tiny=True, quiet=True)
    finally:
        os.umask(old)
    assert summary["family"] == "sdxl" and summary["dtype"] == "float16"
    assert set(summary["parameters"]) == {"unet", "vae", "text_encoder", "text_encoder_2", "total"}
    assert summary["bytes_on_disk"]["total"] >= 2 * summary["parameters"]["total"]
    assert json.loads((out / brm.MARKER).read_text())["random_weights"] is True
    assert [p.name for p in tmp_path.iterdir()] == ["sdxl"]  # the temp directory was renamed
    assert _modes(out) <= {0o755, 0o644}  # the umask's modes, not safetensors' 0o600

    loaded = load_model(str(out), device="cpu")
    assert loaded.family == "sdxl" and type(loaded.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert loaded.info["random_weights"] is True  # manifests made with it say so
    assert loaded.pipe.scheduler.config.timestep_spacing == "trailing"
    with FeatureCapture(loaded.pipe.unet, resolve_layers("compact")) as capture:
        produced = diffuse(loaded, capture, ["a photograph of a cat"], [0], steps=1, size=128, guidance=0.0, feature_step=-1, feature_t=None)
    assert produced.images.shape == (1, 128, 128, 3)
    assert all(torch.isfinite(t).all() and t.shape[0] == 1 for t in produced.features.values())


def test_tiny_sd1_builds_and_runs_gds_ddim_step(brm, tmp_path):
    from iosd.pipeline.capture import FeatureCapture
    from iosd.pipeline.generate import load_configured
    from iosd.pipeline.sources import diffuse

    out = tmp_path / "sd1"
    summary = brm.build("sd1", out, tiny=True, quiet=True)
    assert summary["family"] == "sd" and "text_encoder_2" not in summary["parameters"]
    loaded = load_configured({"model": str(out), "layers": "gd", "scheduler": "ddim"}, "cpu")
    assert loaded.family == "sd" and type(loaded.pipe.scheduler).__name__ == "DDIMScheduler"
    with FeatureCapture(loaded.pipe.unet, ("mid_block",), halves="both") as capture:
        produced = diffuse(loaded, capture, ["a photograph of a cat"], [0], steps=1, size=128, guidance=5.0, feature_step=-1, feature_t=None)
    mid = produced.features["mid_block"]
    assert mid.shape[1] == 2 * loaded.pipe.unet.config.block_out_channels[-1]  # both halves


def test_tiny_float32_build_holds_the_tiny_models_weights(brm, tmp_path):
    from iosd.pipeline.models import TINY_MODEL_SEED, load_model
    from iosd.pipeline.tiny import tiny_pipeline

    out = tmp_path / "m"
    brm.build("sdxl", out, tiny=True, dtype="float32", seed=TINY_MODEL_SEED, quiet=True)
    built, ref = load_model(str(out), device="cpu").pipe, tiny_pipeline(TINY_MODEL_SEED)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ref, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_refuses_a_non_empty_out_in_one_line(brm, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "file").write_text("x")
    assert brm.main(["--family", "sdxl", "--tiny", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not an empty directory" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_full_disk_is_one_line_and_leaves_nothing(brm, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StableDiffusionXLPipeline, "save_pretrained", full)
    assert brm.main(["--family", "sdxl", "--tiny", "--quiet", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and "No space left on device" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # the temp directory is gone

    monkeypatch.setattr(brm, "_free_bytes", lambda path: 1000)  # checked before anything is built
    assert brm.main(["--family", "sdxl", "--quiet", "--out", str(tmp_path / "m")]) == 2
    assert "GB free" in capsys.readouterr().err and list(tmp_path.iterdir()) == []
