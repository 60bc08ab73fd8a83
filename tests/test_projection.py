"""``iosd-gen --project K``: a deterministic basis, stored projected features that equal the
projection of the raw ones, a projected set that trains, evaluates and predicts, and one line
for each bad input (CPU world: tiny model, shapes source, 64 px)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.errors import UserError
from iosd.evaluate.predict_cli import main as predict_main
from iosd.manifest import current_umask
from iosd.pipeline.cli import main as gen_main
from iosd.pipeline.synth_cli import main as synth_main
from iosd.projection import PROJECTION_NAME, CovarianceFit, Projection, from_bytes, load
from iosd.schema import iter_tar_samples
from iosd.train.checkpoint import load_head
from iosd.train.cli import main as train_main

K = 8
# compact preset: 64@4, 64@8, 32@16. float16, not the fp8 default: the checks below are of the
# projection's arithmetic (fp8's own error bounds are tested in test_featstore_fast)
WORLD = dict(resolution=64, num_samples=8, shard_size=4, batch_size=4, feature_dtype="float16")
SMALL_HEAD = ["--head-option=d_model=32", "--head-option=heads=2", "--head-option=ffn=64", "--head-option=visual_channels=[8,8,8]"]
GEN_ARGS = ["--model", "tiny", "--classes", "shapes", "--source", "shapes", "--resolution", "64", "--num-samples", "8", "--shard-size", "4", "--batch-size", "4", "--feature-dtype", "float16", "--quiet"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same world stored raw and projected to K (calibrated on its first 6 candidates)."""
    root = tmp_path_factory.mktemp("projection")
    make_shapes_set(root / "raw", **WORLD)
    make_shapes_set(root / "projected", **WORLD, project=K, calibration_samples=6)
    return root


def _features(set_dir) -> dict[str, dict[str, np.ndarray]]:
    return {s.key: s.features for path in sorted(set_dir.glob("shard-*.tar")) for s in iter_tar_samples(str(path))}


def test_basis_is_deterministic_and_stored_features_are_the_projection_of_the_raw(sets, tmp_path):
    again = tmp_path / "again"
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", str(K), "--calibration-samples", "6", "--out", str(again)])
    assert result.exit_code == 0, result.output
    first = (sets / "projected" / PROJECTION_NAME).read_bytes()
    assert (again / PROJECTION_NAME).stat().st_mode & 0o777 == 0o666 & ~current_umask()  # like any tool's output
    assert (again / PROJECTION_NAME).read_bytes() == first
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (again / name).read_bytes() == (sets / "projected" / name).read_bytes()
    manifest = json.loads((sets / "projected" / "dataset.json").read_text())
    record = manifest["features"]["projection"]
    projection = load(sets / "projected" / PROJECTION_NAME, record)
    assert record["k"] == K and [e["shape"] for e in manifest["features"]["layers"]] == [[K, 4, 4], [K, 8, 8], [K, 16, 16]]
    # the basis is orthonormal, largest variance first
    for basis in projection.bases.values():
        assert torch.allclose(basis.T @ basis, torch.eye(K), atol=1e-5)
    # every stored array is basis^T (raw - mean), up to float16 storage of both sides
    raw, stored = _features(sets / "raw"), _features(sets / "projected")
    assert raw.keys() == stored.keys() and len(raw) == 8
    for key in raw:
        expected = projection.apply_numpy(raw[key])
        assert expected.keys() == stored[key].keys()
        for name, want in expected.items():
            scale = np.abs(want).max()
            assert np.abs(stored[key][name] - want).max() <= 3e-3 * scale, (key, name)


def test_projected_set_trains_evaluates_and_predicts(sets, tmp_path):
    run = tmp_path / "run"
    args = [str(sets / "projected"), "--steps", "3", "--batch-size", "4", "--val", str(sets / "raw"), "--out", str(run), "--workers", "0", "--quiet", "--no-tensorboard", *SMALL_HEAD]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["val_seen_miou"] is not None  # raw held-out shards, projected with the training basis
    head, info = load_head(run)
    assert info["stored_layout"]["projection"]["k"] == K
    raw = json.loads((sets / "raw" / "dataset.json").read_text())
    assert [p for p, _ in info["layout"]["layers"]] == [e["path"] for e in raw["features"]["layers"]]
    # eval's scoring path: raw test features through the checkpoint's basis and head
    from iosd.evaluate.scoring import score

    scores = score(head, sets / "raw", [s["name"] for s in raw["shards"]], [p for p, _ in info["layout"]["layers"]], gt_min_score=0.0, workers=0)
    assert sum(scores.images.values()) >= 8
    # the same logits as the bare head on the stored (projected) features of the same sample
    sample = next(iter_tar_samples(str(sets / "raw" / "shard-000000.tar")))
    stored = next(iter_tar_samples(str(sets / "projected" / "shard-000000.tar")))
    queries, valid = torch.from_numpy(sample.embeddings)[None], torch.ones(1, len(sample.classes), dtype=torch.bool)
    with torch.no_grad():
        through = head({p: torch.from_numpy(a)[None] for p, a in sample.features.items()}, queries, valid)
        direct = head.head({p: torch.from_numpy(a)[None] for p, a in stored.features.items()}, queries, valid)
    assert torch.allclose(through, direct, atol=0.05 * float(direct.abs().max()) + 1e-3)
    out = tmp_path / "predicted"
    result = CliRunner().invoke(predict_main, ["--checkpoint", str(run), "a photograph of a star", "--classes", "star", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "mask-star.png").exists() and json.loads((out / "prediction.json").read_text())["classes"] == ["star"]
    # iosd-synth captures the raw layers and the wrapped head projects them
    result = CliRunner().invoke(synth_main, ["--checkpoint", str(run), "--classes", "star", "--images-per-class", "2", "--format", "coco", "--out", str(tmp_path / "synth"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "synth" / "synth.json").read_text())["images"]
    # a checkpoint whose basis went missing is refused in one line
    step = next((run / "checkpoints").iterdir())
    (step / PROJECTION_NAME).unlink()
    with pytest.raises(UserError, match="projection basis .* is missing"):
        load_head(run)


def test_rerun_reuses_the_basis_and_another_k_is_refused(sets, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(sets / "projected", out)
    before = (out / PROJECTION_NAME).stat().st_mtime_ns
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", str(K), "--calibration-samples", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / PROJECTION_NAME).stat().st_mtime_ns == before  # reused, not refitted
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", "4", "--calibration-samples", "6", "--out", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") <= 2
    assert "stores features projected to K=8, not --project 4" in result.output
    # shards written with a basis that is now missing: refused, never mixed with a new one
    (out / PROJECTION_NAME).unlink()
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", str(K), "--calibration-samples", "6", "--out", str(out)])
    assert result.exit_code == 2 and "is missing" in result.output
    result = CliRunner().invoke(train_main, [str(out), "--steps", "1", "--out", str(tmp_path / "run"), "--workers", "0", "--quiet"])
    assert result.exit_code == 2 and "projection basis" in result.output and "is missing" in result.output


def test_bad_input_is_one_line(sets, tmp_path):
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", "100", "--out", str(tmp_path / "big")])
    assert result.exit_code == 2 and "--project 100 is more than the 64 channels of the 4x4 group" in result.output
    assert not (tmp_path / "big" / PROJECTION_NAME).exists()
    result = CliRunner().invoke(gen_main, [*GEN_ARGS, "--project", "0", "--out", str(tmp_path / "zero")])
    assert result.exit_code == 2 and "not a positive number" in result.output
    # a basis of the wrong shape
    good = load(sets / "projected" / PROJECTION_NAME)
    wrong = Projection(good.k, good.raw_layers, good.means, {**good.bases, "pca8": good.bases["pca8"][:, :3]})
    with pytest.raises(UserError, match=r"group pca8 is mean \[64\], basis \[64, 3\]"):
        from_bytes(wrong.to_bytes(), "wrong.safetensors")
    with pytest.raises(UserError, match="does not match the sha256"):
        from_bytes(wrong.to_bytes(), "wrong.safetensors", {"sha256": "0" * 64})
    with pytest.raises(UserError, match="not a readable iosd projection"):
        from_bytes(b"not a safetensors file", "junk.safetensors")


def test_covariance_fit_is_the_pca_of_its_stream():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=gen)
    x = torch.randn(10, 6, 3, 3, generator=gen)
    x = torch.einsum("bchw,cd->bdhw", x * torch.tensor([5.0, 3, 2, 1, 0.5, 0.1])[None, :, None, None], mixing)
    fit = CovarianceFit([["a", [4, 3, 3]], ["b", [2, 3, 3]]])
    for part in (x[:4], x[4:]):  # batches of any size: the same sums
        fit.add({"a": part[:, :4], "b": part[:, 4:]})
    projection = fit.fit(3)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6).double()
    centred = rows - rows.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = projection.bases["pca3"].double()
    assert torch.allclose((basis.T @ vh[:3].T).abs(), torch.eye(3, dtype=torch.double), atol=1e-4)
    with pytest.raises(UserError, match="--project 7 is more than the 6 channels"):
        fit.fit(7)
