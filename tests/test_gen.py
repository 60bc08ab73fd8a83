"""iosd-gen end to end on the tiny model: shards, manifest, determinism, resume, refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.manifest import read_manifest
from iosd.pipeline.cli import main as gen_main
from iosd.schema import MANIFEST_NAME, REQUIRED_EXTS, iter_tar_samples


def shard_hashes(out) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in read_manifest(out)["shards"]}


def test_shapes_set_has_the_promised_layout(shapes_set):
    manifest = read_manifest(shapes_set)
    assert manifest["complete"] and manifest["counts"]["written"] == 12
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, 4]
    layers = manifest["features"]["layers"]
    assert [entry["path"] for entry in layers] == ["up_blocks.0.attentions.2", "up_blocks.1.attentions.2", "up_blocks.2.resnets.2"]
    assert [entry["shape"][-1] for entry in layers] == [8, 16, 32]
    assert manifest["embedding"]["dim"] == 64 and manifest["image_size"] == [128, 128]
    assert manifest["features"]["stored_bytes_per_sample"] > 0
    seen = set(manifest["classes"]["seen"])
    for sample in iter_tar_samples(str(shapes_set / "shard-000001.tar")):
        assert "." not in sample.key
        assert {c.name for c in sample.classes} <= seen
        assert sample.masks.shape[1:] == (128, 128) and sample.masks.shape[0] == len(sample.targets())
        assert sample.embeddings.shape == (len(sample.classes), 64)
        assert all(c.decision == "kept" and c.score == 1.0 for c in sample.classes)
        for name in sample.prompt.split(" and "):
            assert any(c.name in name for c in sample.classes)


def test_shards_read_with_nothing_but_tarfile_json_numpy_pil_and_zarr(shapes_set):
    """A consumer without iosd installed can read everything (iosd imports are blocked)."""
    code = textwrap.dedent(
        """
        import sys, io, json, tarfile, tempfile, zipfile
        sys.modules["iosd"] = None
        import numpy as np, torch, zarr
        from PIL import Image
        from zarr.storage import ZipStore
        tar = tarfile.open(sys.argv[1])
        groups = {}
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, g in groups.items():
            meta = json.loads(g["json"])
            img = np.asarray(Image.open(io.BytesIO(g["png"])))
            masks = np.load(io.BytesIO(g["masks.npz"]))["masks"]
            emb = np.load(io.BytesIO(g["emb.npy"]))
            with tempfile.NamedTemporaryFile(suffix=".zip") as f:
                f.write(g["feat.zarr.zip"]); f.flush()
                group = zarr.open_group(ZipStore(f.name, mode="r"), mode="r")
                arrays = {k: group[k][...] for k in group.array_keys()}
            kept = [c for c in meta["classes"] if c["decision"] == "kept"]
            assert img.shape == (128, 128, 3) and masks.shape[0] == len(kept) and emb.shape[0] == len(meta["classes"])
            # fp8 by default: e4m3 bits and a float32 scale per channel (value = e4m3(bits) * scale)
            scales = {k: a for k, a in arrays.items() if k.endswith("__scale")}
            bits = {k: a for k, a in arrays.items() if k not in scales}
            assert len(bits) == 3 and {a.dtype.name for a in bits.values()} == {"uint8"}
            assert sorted(scales) == sorted(f"{k}__scale" for k in bits) and {a.dtype.name for a in scales.values()} == {"float32"}
            for k, a in bits.items():
                values = torch.from_numpy(a).view(torch.float8_e4m3fn).float().numpy() * scales[f"{k}__scale"][:, None, None]
                assert np.isfinite(values).all() and np.abs(values).max() > 0
        print(len(groups))
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(shapes_set / "shard-000000.tar")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"


def test_rerun_resumes_and_reproduces_missing_shards(tmp_path, shapes_set):
    out = tmp_path / "set"
    make_shapes_set(out, workers=1)  # other thread count, same bytes
    first = shard_hashes(out)
    assert first == shard_hashes(shapes_set)
    # an interrupted run: shard 1 never finished (temp file left behind), shard 2 lost its record
    (out / "shard-000001.tar").rename(out / ".shard-000001.tar.tmp-999")
    (out / ".parts" / "shard-000002.json").unlink()
    with open(out / "shard-000000.tar", "r+b") as f:  # shard 0 cut short after it was recorded
        f.truncate(1000)
    manifest = read_manifest(out)
    assert not manifest["complete"] or len(manifest["shards"]) == 3
    again = make_shapes_set(out)
    assert again["complete"] and shard_hashes(out) == first
    on_disk = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in first}
    assert on_disk == first  # the files themselves, not only the manifest's record of them


def test_different_config_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    make_shapes_set(out, num_samples=4)
    runner = CliRunner()
    args = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--num-samples", "4", "--shard-size", "4", "--seed", "1", "--out", str(out), "--quiet"]
    result = runner.invoke(gen_main, args)
    assert result.exit_code == 2 and "different config (differs in: seed)" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(gen_main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["config"]["seed"] == 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--classes", "imagenet"], "unknown class set"),
        (["--split", "4"], "outside 1..3"),
        (["--num-samples", "0"], "--num-samples must be positive"),
        (["--shard-size", "-1"], "--shard-size must be positive"),
        (["--source", "shapes", "--classes", "coco"], "pass --classes shapes"),
        (["--layers", "bogus"], "unknown feature layer preset"),
        (["--template", "no slot"], "needs exactly one {}"),
        (["--resolution", "0"], "--resolution 0"),
        (["--steps", "2", "--feature-step", "2"], "--feature-step 2"),
        (["--min-score", "1.5"], "outside 0..1"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path):
    result = CliRunner().invoke(gen_main, ["--model", "tiny", "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_foreign_or_unwritable_output_is_refused(tmp_path):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    args = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--num-samples", "2", "--shard-size", "2", "--quiet"]
    result = CliRunner().invoke(gen_main, [*args, "--out", str(foreign)])
    assert result.exit_code == 2 and "not an iosd shard set" in result.output
    assert (foreign / "holiday.jpg").read_bytes() == b"x"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = CliRunner().invoke(gen_main, [*args, "--out", str(locked / "set")])
        assert result.exit_code == 2 and "cannot write" in result.output


def test_unreachable_model_says_so():
    result = CliRunner().invoke(gen_main, ["--model", "someone/no-such-model", "--num-samples", "1", "--classes", "pascal"])
    assert result.exit_code == 2
    assert "unreachable" in result.output and "--model tiny" in result.output


GEN_ARGS = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--num-samples", "12", "--shard-size", "4", "--batch-size", "4", "--seed", "0", "--quiet"]


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_same_samples_as_one_process(tmp_path):
    # Same numeric environment for both (torchrun sets one OpenMP thread per rank): CPU
    # kernels round differently with other thread counts.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    subprocess.run([sys.executable, "-m", "iosd.pipeline.cli", *GEN_ARGS, "--out", str(single)], check=True, capture_output=True, env=env, timeout=600)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "iosd.pipeline.cli", *GEN_ARGS, "--out", str(ranked)]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
    manifest = json.loads((ranked / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["counts"]["written"] == 12
    assert shard_hashes(ranked) == shard_hashes(single)
    with tarfile.open(ranked / "shard-000001.tar") as tar:
        exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
    assert set(REQUIRED_EXTS) <= exts


@pytest.mark.teacher
def test_tiny_diffusion_run_goes_through_the_real_mmdet_teacher(tmp_path):
    """--model tiny with no teacher options: SDXL classes + mmdet's own Mask R-CNN, random weights."""
    out = tmp_path / "voc"
    args = ["--classes", "pascal", "--split", "1", "--model", "tiny", "--objects", "2", "--num-samples", "3", "--shard-size", "3", "--batch-size", "3", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(gen_main, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest["teacher"]["random_weights"] is True and manifest["masks_meaningful"] is False
    assert manifest["teacher"]["config"].startswith("mask-rcnn_r50_fpn")
    assert manifest["counts"]["written"] == 3
    samples = list(iter_tar_samples(str(out / "shard-000000.tar"), features=False))
    seen = set(manifest["classes"]["seen"])
    for sample in samples:
        assert sample.image.shape == (128, 128, 3) and sample.embeddings.shape[0] == len(sample.classes)
        for record in sample.classes:
            assert record.name in seen and 0.0 <= record.score <= 1.0
            assert record.decision in ("kept", "empty_mask", "low_score")
            if record.mask_index is not None:
                assert sample.masks[record.mask_index].sum() == record.mask_pixels > 0
    assert manifest["counts"]["candidates"] >= 3


def test_generation_gives_the_callers_cpu_threads_back(tmp_path):
    # generation lowers torch's threads for its encode threads; later work in the same process
    # (training after generating, a test session) must get them back
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        make_shapes_set(tmp_path / "set", num_samples=2, shard_size=2, batch_size=2)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_features_cast_to_float16_on_the_device_store_the_same_bits_as_numpy():
    """iosd-gen moves float16-stored features off the device as float16 (half the bytes); the
    shards stay byte-identical only if torch's cast rounds as numpy's does, edge cases included."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(10_000).astype(np.float32) * 50,
        np.array([65504.0, 65520.0, 70000.0, -1e9, 6e-8, 3e-8, 1e-10, 0.0, -0.0, np.inf, -np.inf, np.nan], np.float32),
        (np.arange(1, 2049, dtype=np.float32) + 0.5) * 2.0**-10,  # ties between float16 neighbours
    ])
    ours = torch.from_numpy(x).to(torch.float16).numpy().view(np.uint16)
    numpy_cast = x.astype(np.float16).view(np.uint16)
    finite = np.isfinite(x)
    assert np.array_equal(ours[finite], numpy_cast[finite])
    assert np.array_equal(np.isnan(ours.view(np.float16)), np.isnan(numpy_cast.view(np.float16)))
