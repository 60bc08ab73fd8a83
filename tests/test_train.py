"""iosd-train end to end on shapes-world shards: checkpoints, resume, DDP, bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.featstore import decode_features, encode_features, open_feature_group
from iosd.manifest import write_json_atomic
from iosd.schema import EXT_FEAT, MANIFEST_NAME
from iosd.train.checkpoint import MODEL_NAME, load_head, read_checkpoint
from iosd.train.cli import main as train_main
from iosd.train.runlog import read_metrics

QUICK = ["--batch-size", "4", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=64", "--head-option", "ffn=128"]


def train(*args: str):
    return CliRunner().invoke(train_main, [*map(str, args)])


def losses(run) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


def test_checkpoint_is_safetensors_plus_json_and_loads_back(shapes_set, tmp_path):
    run = tmp_path / "run"
    result = train(shapes_set, "--steps", "6", "--save-every", "3", "--log-every", "1", "--out", run, *QUICK)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 6 and not summary["interrupted"]
    info, weights = read_checkpoint(run)
    assert info["step"] == 6 and info["head"]["kind"] == "iosd-lite" and info["recipe"]["name"] == "fast" and info["layout"]["embedding_dim"] > 0
    assert info["classes"]["name"] == "shapes" and info["generation"]["source"] == "shapes"
    assert info["train"]["args"]["lr"] == 1e-4 and info["train"]["args"]["weight_decay"] == 1e-4
    assert sorted(p.name for p in weights.iterdir()) == ["checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pth")) and not list(run.rglob("*.pkl"))
    assert (run / "curve.png").exists() and len(losses(run)) == 6
    head, _ = load_head(run)
    assert not head.training
    # a checkpoint that is not safetensors is refused, not unpickled
    (weights / MODEL_NAME).write_bytes(b"\x80\x04garbage")
    with pytest.raises(Exception, match="not a readable safetensors"):
        load_head(run)


def test_resumed_run_continues_the_loss_curve(shapes_set, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(shapes_set, "--steps", "8", "--save-every", "4", "--log-every", "1", "--out", whole, *QUICK).exit_code == 0
    assert train(shapes_set, "--steps", "4", "--save-every", "4", "--log-every", "1", "--out", cut, *QUICK).exit_code == 0
    again = train(shapes_set, "--steps", "8", "--out", cut, "--resume", "--quiet")
    assert again.exit_code == 0, again.output
    assert read_checkpoint(cut)[0]["step"] == 8
    # same data position, optimizer state and RNG: the resumed curve is the uninterrupted one
    assert [s for s, _ in losses(cut)] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in losses(cut)], [v for _, v in losses(whole)], rtol=1e-5)


def test_a_run_cut_off_before_its_first_checkpoint_starts_over_cleanly(shapes_set, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # left by the cut-off run
    (run / ".checkpoint.json.abc.tmp").write_text("{")  # a temp file the kill left behind
    result = train(shapes_set, "--steps", "2", "--log-every", "1", "--out", run, *QUICK)
    assert result.exit_code == 0, result.output
    assert [s for s, _ in losses(run)] == [1, 2] and 9.0 not in [v for _, v in losses(run)]
    assert not list(run.glob(".*.tmp"))


def test_resume_with_several_workers_keeps_their_batch_order(shapes_set, tmp_path):
    # cut at an odd step: the next batch is worker 1's, and the resumed loader must start there
    quick = [a if a != "0" else "2" for a in QUICK]  # --workers 2
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train(shapes_set, "--steps", "6", "--log-every", "1", "--out", whole, *quick).exit_code == 0
    assert train(shapes_set, "--steps", "3", "--save-every", "3", "--log-every", "1", "--out", cut, *quick).exit_code == 0
    assert read_checkpoint(cut)[0]["train"]["data_position"]["next_worker"] == [1]
    again = train(shapes_set, "--steps", "6", "--out", cut, "--resume", "--quiet", "--workers", "2")
    assert again.exit_code == 0, again.output
    np.testing.assert_allclose([v for _, v in losses(cut)], [v for _, v in losses(whole)], rtol=1e-5)


def test_existing_run_needs_resume_or_overwrite_and_foreign_dirs_are_refused(shapes_set, tmp_path):
    run = tmp_path / "run"
    assert train(shapes_set, "--steps", "2", "--out", run, *QUICK).exit_code == 0
    again = train(shapes_set, "--steps", "2", "--out", run, *QUICK)
    assert again.exit_code == 2 and "--resume" in again.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = train(shapes_set, "--steps", "2", "--out", foreign, "--resume", *QUICK)
    assert result.exit_code == 2 and "holds no iosd-train checkpoint" in result.output
    result = train(shapes_set, "--steps", "2", "--out", foreign, *QUICK)
    assert result.exit_code == 2 and "not an iosd-train run" in result.output
    assert (foreign / "notes.txt").read_text() == "mine"
    changed = train(shapes_set, "--steps", "4", "--out", run, "--resume", "--head", "gd")
    assert changed.exit_code == 2 and "cannot change" in changed.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no dataset.json"),
        (lambda d: (d.mkdir(), (d / MANIFEST_NAME).write_text("{not json")), "not readable JSON"),
        (lambda d: (d.mkdir(), write_json_atomic(d / MANIFEST_NAME, {"schema_version": 99})), "newer than this iosd reads"),
    ],
)
def test_bad_shard_sets_are_one_line_errors(make, message, tmp_path):
    make(tmp_path / "set")
    result = train(tmp_path / "set", "--steps", "2", "--out", tmp_path / "run", *QUICK)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def copy_set(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_skipped_with_a_warning_or_fails_by_flag(shapes_set, tmp_path):
    broken = copy_set(shapes_set, tmp_path / "broken")
    tar = broken / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    result = CliRunner().invoke(train_main, [str(broken), "--steps", "3", "--out", str(tmp_path / "warn"), *QUICK])
    assert result.exit_code == 0, result.output
    assert "shard-000001.tar" in result.output and "skipped" in result.output
    result = train(broken, "--steps", "3", "--out", tmp_path / "fail", "--on-corrupt", "fail", *QUICK)
    assert result.exit_code == 2 and "shard-000001.tar" in result.output and "--on-corrupt warn" in result.output


def rewrite_features(tar_path, change) -> None:
    """Rewrite every sample's features through ``change(dict) -> dict`` (same tar layout)."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            if info.name.endswith("." + EXT_FEAT):
                dtype = open_feature_group(data).attrs["iosd_features"]["dtype"]  # as the manifest states it
                data = encode_features(change(decode_features(data)), dtype)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_nan_features_are_named_and_a_layout_mismatch_is_refused(shapes_set, tmp_path):
    nan = copy_set(shapes_set, tmp_path / "nan")
    rewrite_features(nan / "shard-000000.tar", lambda f: {k: np.full_like(v, np.nan) for k, v in f.items()})
    result = train(nan, "--steps", "3", "--out", tmp_path / "r1", "--on-corrupt", "fail", *QUICK)
    assert result.exit_code == 2 and "NaN" in result.output and "shard-000000.tar" in result.output
    # a head trained on one layout cannot start (--init) from shards of another
    run = tmp_path / "run"
    assert train(shapes_set, "--steps", "2", "--out", run, *QUICK).exit_code == 0
    other = tmp_path / "other"
    make_shapes_set(other, num_samples=4, shard_size=4, layers="mid_block")
    result = train(other, "--steps", "2", "--out", tmp_path / "r2", "--init", run, *QUICK)
    assert result.exit_code == 2 and "another feature layout" in result.output


def test_brace_pattern_without_manifest_reads_the_layout_from_a_sample(shapes_set, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in shapes_set.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    result = train(f"{bare}/shard-{{000000..000002}}.tar", "--steps", "2", "--out", tmp_path / "run", *QUICK)
    assert result.exit_code == 0, result.output
    assert read_checkpoint(tmp_path / "run")[0]["layout"]["layers"]


@pytest.mark.slow
def test_torchrun_two_ranks_one_shard_no_hang(tmp_path):
    """2 CPU ranks x 2 workers over a single shard: same steps on every rank, one checkpoint."""
    shards = tmp_path / "one"
    make_shapes_set(shards, num_samples=4, shard_size=4)
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "iosd.train.cli",
           str(shards), "--steps", "6", "--save-every", "3", "--out", str(run), "--batch-size", "2", "--workers", "2", "--quiet",
           "--no-tensorboard", "--head-option", "d_model=64", "--head-option", "ffn=128"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["steps_per_rank"] == [6, 6]
    info, _ = read_checkpoint(run)
    assert info["step"] == 6 and info["train"]["world"] == 2
    assert len(list((run / "checkpoints").iterdir())) == 1


def test_trains_from_an_http_url(shapes_set, tmp_path):
    """A shard set shared over HTTP: manifest and tars fetched by URL, as another machine would."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_set))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        result = train(url, "--steps", "3", "--out", tmp_path / "run", *QUICK)
        assert result.exit_code == 0, result.output
        info, _ = read_checkpoint(tmp_path / "run")
        assert info["shards"]["spec"] == url and info["shards"]["shards"] == 3
    finally:
        server.shutdown()


def test_trains_from_an_fsspec_url_as_s3_and_gs_sets_are_read(shapes_set, tmp_path):
    """s3:// and gs:// go through fsspec; its in-memory filesystem takes the same code path."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shapes_set.iterdir():
        if path.is_file():
            fs.pipe(f"/shared/shapes/{path.name}", path.read_bytes())
    try:
        for spec in ("memory://shared/shapes", "memory://shared/shapes/shard-{000000..000002}.tar"):
            run = tmp_path / str(abs(hash(spec)))
            result = train(spec, "--steps", "2", "--out", run, *QUICK)
            assert result.exit_code == 0, result.output
            info, _ = read_checkpoint(run)
            assert info["shards"]["shards"] == 3 and info["shards"]["manifest_sha256"] is not None
        result = train("nosuchfs://bucket/set", "--steps", "1", "--out", tmp_path / "x", *QUICK)
        assert result.exit_code == 2 and "nosuchfs" in result.output and "Traceback" not in result.output
    finally:
        fs.rm("/shared", recursive=True)
