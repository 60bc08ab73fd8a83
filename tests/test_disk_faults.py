"""A full disk or an unwritable output ends every command in one line, leaves no temp file,
and the same command rerun resumes."""

from __future__ import annotations

import errno
import json

import click
import pytest
from click.testing import CliRunner
from safetensors import SafetensorError

from iosd.errors import user_errors
from iosd.pipeline import writer
from iosd.pipeline.cli import main as gen_main
from iosd.train import checkpoint
from iosd.train.cli import main as train_main

GEN = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--num-samples", "6", "--shard-size", "2", "--batch-size", "2", "--workers", "1", "--quiet"]
TRAIN = ["--batch-size", "2", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=32", "--head-option", "ffn=64"]


def temp_files(root) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name)]


@pytest.mark.parametrize(("err", "line"), [
    (OSError(errno.ENOSPC, "No space left on device", "out/.shard-000003.tar.tmp-77"), "no space left on device writing out/shard-000003.tar (free space or pass --out elsewhere"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded (free space"),
    (PermissionError(errno.EACCES, "Permission denied", "out/x"), "permission denied on out/x (make it writable or pass --out elsewhere"),
    (OSError(errno.EROFS, "Read-only file system", "out"), "read-only file system on out"),
    (PermissionError(errno.EPERM, "Operation not permitted", "out"), "operation not permitted on out"),
    (SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'), "no space left on device (free space"),
])
def test_storage_faults_are_one_line(err, line):
    @click.command()
    @user_errors
    def cmd() -> None:
        raise err

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 2 and line in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("decorate, line", [
    (user_errors, "interrupted: finished shards are kept; rerun the same command to resume"),
    (user_errors(kept="checkpoints are kept"), "interrupted: checkpoints are kept; rerun the same command to resume"),
    (user_errors(kept="nothing was written", rerun="then rerun the same command"), "interrupted: nothing was written; rerun the same command"),
])
def test_ctrl_c_says_what_each_command_keeps(decorate, line):
    @click.command()
    @decorate
    def cmd() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 130 and result.output.strip() == line, result.output


def test_other_os_errors_still_raise():
    @click.command()
    @user_errors
    def cmd() -> None:
        raise OSError(errno.EIO, "Input/output error")

    assert isinstance(CliRunner().invoke(cmd, []).exception, OSError)


def test_full_disk_during_gen_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    out = tmp_path / "set"
    written = {"n": 0}
    real = writer._HashingSink.write

    def full_after_one_shard(self, data):
        written["n"] += len(data)
        if written["n"] > 250_000:  # a shard is ~180 kB: the second one hits the full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(writer._HashingSink, "write", full_after_one_shard)
    result = CliRunner().invoke(gen_main, [*GEN, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "no space left on device writing" in result.output and "shard-00000" in result.output and "rerun the same command to resume" in result.output
    assert temp_files(out) == []
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert kept, "the shard finished before the disk filled is kept"
    monkeypatch.setattr(writer._HashingSink, "write", real)
    again = CliRunner().invoke(gen_main, [*GEN, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["complete"] is True
    assert all((out / name).stat().st_mtime_ns == t for name, t in kept.items()), "finished shards are not rewritten"


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left on device writing"), (errno.EROFS, "read-only file system on")])
def test_checkpoint_write_fault_is_one_line_and_resume_continues(shapes_set, tmp_path, monkeypatch, code, words):
    run = tmp_path / "run"
    assert CliRunner().invoke(train_main, [str(shapes_set), "--steps", "2", "--save-every", "2", "--out", str(run), *TRAIN]).exit_code == 0
    real = checkpoint.save_file

    def fails(tensors, path, metadata=None):
        raise SafetensorError(f'Error while serializing: IoError(Os {{ code: {code}, kind: Other, message: "{errno.errorcode[code]}" }})')

    monkeypatch.setattr(checkpoint, "save_file", fails)
    result = CliRunner().invoke(train_main, [str(shapes_set), "--steps", "4", "--out", str(run), "--resume", *TRAIN])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert words in result.output and "step-0000004/model.safetensors" in result.output and "rerun with --resume" in result.output
    assert temp_files(run) == []
    monkeypatch.setattr(checkpoint, "save_file", real)
    again = CliRunner().invoke(train_main, [str(shapes_set), "--steps", "4", "--out", str(run), "--resume", *TRAIN])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["step"] == 4
