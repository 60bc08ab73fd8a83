"""``iosd-shards verify/info/show`` on small shard sets written here, and the picture helpers."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from iosd.errors import UserError
from iosd.featstore import encode_features
from iosd.manifest import write_json_atomic
from iosd.pipeline.shards_cli import main
from iosd.pipeline.verify import verify_shards
from iosd.schema import (
    KEPT,
    LOW_SCORE,
    SCHEMA_VERSION,
    ClassRecord,
    Sample,
    encode_sample,
    shard_name,
)
from iosd.viz import colour, grid, overlay, save_png_atomic

LAYERS = {"up_blocks.0.attentions.2": (8, 4, 4), "up_blocks.2.resnets.2": (4, 8, 8)}
CLASSES = ["disc", "star", "ring"]
SIDE = 32


# -- a small shard set, written with nothing but the schema and webdataset ----------------
def _sample(shard: int, index: int, layers=LAYERS) -> dict:
    rng = np.random.default_rng(shard * 100 + index)
    names = [CLASSES[(shard + index) % 3], CLASSES[(shard + index + 1) % 3]]
    masks = np.zeros((1, SIDE, SIDE), np.uint8)
    masks[0, 4:20, 6:22] = 1
    records = [
        ClassRecord(names[0], "seen", 1.0, int(masks[0].sum()), KEPT, 0),
        ClassRecord(names[1], "seen", 0.3, 50, LOW_SCORE, None),
    ]
    sample = Sample(
        key=f"{shard:06d}_{index:05d}",
        image=rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8),
        prompt=f"a photograph of a {names[0]} and a {names[1]}",
        seed=index,
        classes=records,
        masks=masks,
        embeddings=rng.standard_normal((2, 16)).astype(np.float32),
    )
    feats = {path: rng.standard_normal(shape).astype(np.float32) for path, shape in layers.items()}
    return encode_sample(sample, encode_features(feats, "float16", "blosc-zstd"))


def _write_tar(path: Path, samples: list[dict]) -> dict:
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
    data = buf.getvalue()
    path.write_bytes(data)
    return {"name": path.name, "samples": len(samples), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_set(out: Path, n_shards: int = 3, per_shard: int = 2, **manifest_overrides) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    shards = [_write_tar(out / shard_name(s), [_sample(s, i) for i in range(per_shard)]) for s in range(n_shards)]
    per_class: dict[str, dict[str, int]] = {}
    for s in range(n_shards):
        for i in range(per_shard):
            kept, low = CLASSES[(s + i) % 3], CLASSES[(s + i + 1) % 3]
            per_class.setdefault(kept, {}).setdefault(KEPT, 0)
            per_class[kept][KEPT] += 1
            per_class.setdefault(low, {}).setdefault(LOW_SCORE, 0)
            per_class[low][LOW_SCORE] += 1
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "iosd_version": "0.1.0",
        "config": {"model": "tiny", "steps": 1, "resolution": SIDE, "source": "shapes", "mask_thr": 0.5, "min_score": 0.0},
        "classes": {"name": "shapes", "split": 1, "seen": CLASSES, "unseen": ["heart"]},
        "subset": "seen",
        "features": {"layers": [{"path": p, "key": p.replace(".", "_"), "shape": list(s)} for p, s in LAYERS.items()], "dtype": "float16", "codec": "blosc-zstd", "raw_bytes_per_sample": 768},
        "embedding": {"dim": 16, "template": "{}", "encoders": ["tiny"]},
        "image_size": [SIDE, SIDE],
        "teacher": {"kind": "exact", "source": "shapes"},
        "counts": {"written": n_shards * per_shard, "per_class": per_class},
        "shards": shards,
        "planned_shards": n_shards,
        "complete": True,
        "masks_meaningful": True,
        **manifest_overrides,
    }
    write_json_atomic(out / "dataset.json", manifest)
    return out


@pytest.fixture
def good_set(tmp_path) -> Path:
    return write_set(tmp_path / "set")


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.split(" ", 1)[0] in {"MISSING", "CORRUPT", "EXTRA", "INCOMPLETE", "MANIFEST"}]


# -- verify --------------------------------------------------------------------------------
def test_verify_passes_a_good_set(good_set):
    result = run("verify", good_set)
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "6 samples decoded" in result.output
    assert _problem_lines(result.output) == []


def test_verify_hashes_every_byte_once_with_progress(good_set):
    seen: list[int] = []
    report = verify_shards(good_set, progress=seen.append)
    assert report.ok and report.samples == 6
    assert sum(seen) == sum(p.stat().st_size for p in good_set.glob("shard-*.tar")) == report.bytes


@pytest.mark.parametrize("cut", ["half", "block"])
def test_truncated_shard_is_corrupt_not_a_crash(good_set, cut):
    path = good_set / "shard-000001.tar"
    data = path.read_bytes()
    keep = len(data) // 2 if cut == "half" else 1024  # mid-member, or on a header boundary
    path.write_bytes(data[:keep])
    result = run("verify", good_set)
    assert result.exit_code == 1, result.output
    lines = _problem_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("CORRUPT    shard-000001.tar: truncated"), lines
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_missing_shard_is_named(good_set):
    (good_set / "shard-000002.tar").unlink()
    result = run("verify", good_set)
    assert result.exit_code == 1
    assert _problem_lines(result.output) == ["MISSING    shard-000002.tar: file not found"]


def test_flipped_byte_is_caught_by_sha256(good_set):
    path = good_set / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    result = run("verify", good_set)
    assert result.exit_code == 1
    lines = _problem_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("CORRUPT    shard-000000.tar") and "sha256" in lines[0], lines


def test_damaged_member_header_midway_is_caught(good_set):
    path = good_set / "shard-000002.tar"
    with tarfile.open(path) as tar:
        second = [m.offset for m in tar.getmembers() if m.name.startswith("000002_00001")][0]
    data = bytearray(path.read_bytes())
    data[second + 3] ^= 0xFF  # tarfile stops silently at a bad header after the first one
    path.write_bytes(bytes(data))
    report = verify_shards(good_set)
    assert [(p.name, p.kind) for p in report.problems] == [("shard-000002.tar", "corrupt")]
    assert "ends early" in report.problems[0].reason and "1 samples, manifest says 2" in report.problems[0].reason


def test_sample_problems_are_found_even_when_the_hash_matches(tmp_path):
    out = write_set(tmp_path / "set")
    # shard 1 rewritten: one sample without features, one with another feature layout;
    # the manifest records the new hash, so only the content checks can notice
    broken = _sample(1, 0)
    del broken["feat.zarr.zip"]
    other = _sample(1, 1, layers={"up_blocks.0.attentions.2": (8, 2, 2)})
    entry = _write_tar(out / "shard-000001.tar", [broken, other])
    manifest = json.loads((out / "dataset.json").read_text())
    manifest["shards"][1] = entry
    write_json_atomic(out / "dataset.json", manifest)
    report = verify_shards(out)
    assert [(p.name, p.kind) for p in report.problems] == [("shard-000001.tar", "corrupt")]
    reason = report.problems[0].reason
    assert "2 bad samples" in reason and "lacks feat.zarr.zip" in reason
    assert "sha256" not in reason


def test_extra_tar_and_unfinished_manifest_are_reported(tmp_path):
    out = write_set(tmp_path / "set", complete=False, planned_shards=5)
    shutil.copy(out / "shard-000000.tar", out / "shard-000009.tar")
    result = run("verify", out)
    assert result.exit_code == 1
    lines = _problem_lines(result.output)
    assert any(line.startswith("EXTRA      shard-000009.tar") for line in lines), lines
    assert any(line.startswith("INCOMPLETE dataset.json") and "3 of 5" in line for line in lines), lines
    assert len(lines) == 2


@pytest.mark.parametrize("command", ["verify", "info", "show"])
def test_bad_directories_are_one_line_user_errors(tmp_path, command):
    result = run(command, tmp_path / "nope")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(command, empty)
    assert result.exit_code == 2 and "no dataset.json" in result.output
    newer = write_set(tmp_path / "newer", n_shards=1, schema_version=SCHEMA_VERSION + 1)
    result = run(command, newer)
    assert result.exit_code == 2 and "newer than this iosd reads" in result.output


# -- info ----------------------------------------------------------------------------------
def test_info_table_names_classes_layers_and_flags(good_set):
    result = run("info", good_set)
    assert result.exit_code == 0, result.output
    for text in ("disc", "star", "ring", "up_blocks.2.resnets.2", "4 x 8 x 8", "blosc-zstd", "masks meaningful", "tiny"):
        assert text in result.output, text


def test_info_json_counts_match_the_samples(good_set):
    result = run("info", good_set, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["shards"], info["samples"], info["complete"], info["masks_meaningful"]) == (3, 6, True, True)
    assert info["bytes"] == sum(p.stat().st_size for p in good_set.glob("shard-*.tar"))
    assert info["bytes_per_sample"] == round(info["bytes"] / 6)
    assert info["features"]["layers"][1] == {"path": "up_blocks.2.resnets.2", "shape": [4, 8, 8]}
    assert info["config"]["model"] == "tiny" and info["classes"]["unseen"] == ["heart"]
    assert sum(c[KEPT] for c in info["per_class"].values()) == 6
    scanned = json.loads(run("info", good_set, "--json", "--scan").output)
    assert scanned["per_class_source"] == "samples"
    assert scanned["per_class"] == info["per_class"]


# -- show ----------------------------------------------------------------------------------
def test_show_writes_a_preview_grid(good_set, tmp_path):
    result = run("show", good_set)
    assert result.exit_code == 0, result.output
    preview = Image.open(good_set / "preview.png")
    assert preview.size == (4 * 192, 2 * (192 + 14))  # 6 samples in rows of 4, titled
    out = tmp_path / "pics" / "three.png"
    result = run("show", good_set, "--n", "3", "--ncols", "3", "--out", out)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (3 * 192, 192 + 14)
    assert not list(out.parent.glob(".*.tmp"))


def test_show_refuses_a_corrupt_shard(good_set):
    (good_set / "shard-000000.tar").write_bytes(b"not a tar at all" * 40)
    result = run("show", good_set)
    assert result.exit_code == 2 and "iosd-shards verify" in result.output


@pytest.mark.slow
def test_verify_accepts_a_generated_set(shapes_set):
    result = run("verify", shapes_set)
    assert result.exit_code == 0, result.output


# -- pictures ------------------------------------------------------------------------------
def test_overlay_tints_masks_in_distinct_colours_and_keeps_the_rest():
    image = np.full((40, 40, 3), 128, np.uint8)
    masks = np.zeros((2, 40, 40), bool)
    masks[0, 5:15, 5:15] = True
    masks[1, 25:35, 25:35] = True
    out = overlay(image, masks, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[20, 20], image[20, 20])  # untouched between the masks
    assert tuple(out[5, 5]) == colour(0) and tuple(out[25, 25]) == colour(1)  # outlines
    assert colour(0) != colour(1)
    inner = (np.asarray(colour(0)) + 128) // 2
    assert np.abs(out[10, 10].astype(int) - inner).max() <= 1
    # masks at feature resolution are resized to the image
    small = overlay(image, masks[:, ::4, ::4], labels=["disc", "star"])
    assert small.shape == image.shape
    with pytest.raises(UserError, match="labels for"):
        overlay(image, masks, labels=["disc"])


def test_grid_lays_out_tiles_with_titles_and_saves_atomically(tmp_path):
    tiles = [np.zeros((10, 20, 3), np.uint8), np.ones((30, 30)), np.zeros((5, 5, 3), np.uint8)]
    sheet = grid(tiles, ["a", "b", "a very long title that cannot fit in the tile"], ncols=2, tile=64)
    assert sheet.size == (2 * 64, 2 * (64 + 14))
    assert grid(tiles, ncols=5, tile=32).size == (3 * 32, 32)
    path = save_png_atomic(sheet, tmp_path / "sub" / "grid.png")
    assert Image.open(path).size == sheet.size and [p.name for p in path.parent.iterdir()] == ["grid.png"]
    with pytest.raises(UserError):
        grid([])
