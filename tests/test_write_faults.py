"""An output that cannot be written, and a shard that goes away under a running trainer: every
command ends in one line naming the path and the fix, leaves no temp file, and the same command
completes once the fault is gone (``--resume`` where a checkpoint was saved).

An unwritable directory is ``chmod 0o555``. Where that does not stop this process (root, or
CAP_DAC_OVERRIDE), the same refusal is made at the file-system calls the commands really use:
creating, replacing or removing an entry under the directory fails with EACCES (safetensors'
Rust writer with its own error) and ``os.access`` says no, as for a 0o555 directory.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import QUICK_TRAIN, make_tiny_run

from iosd.evaluate.cli import main as eval_main
from iosd.evaluate.predict_cli import main as predict_main
from iosd.pipeline.cli import main as gen_main
from iosd.pipeline.shards_cli import main as shards_main
from iosd.pipeline.synth_cli import main as synth_main
from iosd.train import checkpoint, data
from iosd.train.cli import main as train_main

GEN = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--resolution", "64", "--num-samples", "4", "--shard-size", "2", "--batch-size", "2", "--workers", "1", "--quiet"]
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 1-step iosd-lite run on a 64 px shapes set of 8 samples in 2 shards (ROOT/set, ROOT/run)."""
    return make_tiny_run(tmp_path_factory.mktemp("write-faults"), steps=1)


def _writes_refused(root: Path) -> bool:
    probe = root / ".write-test-probe.tmp"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return True
    probe.unlink()
    return False


@contextmanager
def not_writable(monkeypatch, root: Path):
    """``root`` and every folder below it refuse new entries while the block runs."""
    dirs = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(0o555)
    try:
        if _writes_refused(root):
            yield
        else:
            with _refused_under(monkeypatch, root):
                yield
    finally:
        for d in dirs:
            d.chmod(0o755)


@contextmanager
def _refused_under(monkeypatch, root: Path):
    top = os.path.realpath(root)

    def under(path) -> bool:
        try:
            full = os.path.realpath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return False
        return full == top or full.startswith(top + os.sep)

    def refused(path, path2=None) -> PermissionError:
        return PermissionError(errno.EACCES, "Permission denied", os.fsdecode(os.fspath(path)), None, path2 and os.fsdecode(os.fspath(path2)))

    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "unlink", "rmdir", "access")}
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and under(file):
            raise refused(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None and flags & _WRITES and under(path):
            raise refused(path)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def fake_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is None and under(path):
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, "File exists", os.fsdecode(os.fspath(path)))
            raise refused(path)
        return real["mkdir"](path, mode, dir_fd=dir_fd)

    def moves(name):
        def fake(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            if src_dir_fd is None and dst_dir_fd is None and (under(src) or under(dst)):
                raise refused(src, dst)
            return real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return fake

    def removes(name):
        def fake(path, *, dir_fd=None):
            if dir_fd is None and under(path):
                raise refused(path)
            return real[name](path, dir_fd=dir_fd)
        return fake

    def fake_access(path, mode, *args, **kwargs):
        if mode & os.W_OK and under(path):
            return False
        return real["access"](path, mode, *args, **kwargs)

    real_save = checkpoint.save_file

    def fake_save_file(tensors, filename, metadata=None):  # safetensors writes from Rust, past open()
        if under(filename):
            from safetensors import SafetensorError

            raise SafetensorError('Error while serializing: IoError(Os { code: 13, kind: PermissionDenied, message: "Permission denied" })')
        return real_save(tensors, filename, metadata=metadata)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", fake_open)
        m.setattr(io, "open", fake_open)
        m.setattr(os, "open", fake_os_open)
        m.setattr(os, "mkdir", fake_mkdir)
        m.setattr(os, "replace", moves("replace"))
        m.setattr(os, "rename", moves("rename"))
        m.setattr(os, "unlink", removes("unlink"))
        m.setattr(os, "remove", removes("unlink"))
        m.setattr(os, "rmdir", removes("rmdir"))
        m.setattr(os, "access", fake_access)
        m.setattr(checkpoint, "save_file", fake_save_file)
        yield


def leftovers(root: Path) -> list[str]:
    """Temp files and write probes, anywhere below ``root``."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name or ".write-test" in p.name)]


def one_line(result, *words: str) -> str:
    """The failed command's output: one line, no traceback, naming each of ``words``."""
    text = result.output.strip()
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), (result.exit_code, text, result.exc_info)
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


def unwritable_dir(tmp_path: Path, name: str = "ro") -> Path:
    d = tmp_path / name
    d.mkdir()
    return d


# -- 1. an output that cannot be written, for every command --------------------------------------
def test_gen_to_an_unwritable_out(tmp_path, monkeypatch):
    out = unwritable_dir(tmp_path)
    with not_writable(monkeypatch, out):
        result = CliRunner().invoke(gen_main, [*GEN, "--out", str(out)])
    one_line(result, str(out), "writable")
    assert list(out.iterdir()) == []
    again = CliRunner().invoke(gen_main, [*GEN, "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["complete"] is True


def test_train_to_an_unwritable_out_and_resume_into_one(tiny, tmp_path, monkeypatch):
    shards, run = str(tiny.parent / "set"), unwritable_dir(tmp_path, "run")
    with not_writable(monkeypatch, run):  # refused before any step, not at the first log line
        result = CliRunner().invoke(train_main, [shards, "--steps", "1", "--out", str(run), *QUICK_TRAIN])
    one_line(result, f"cannot write to --out {run}", "make it writable", "rerun")
    assert list(run.iterdir()) == []
    assert CliRunner().invoke(train_main, [shards, "--steps", "1", "--out", str(run), *QUICK_TRAIN]).exit_code == 0
    saved = (run / checkpoint.CHECKPOINT_NAME).read_bytes()
    with not_writable(monkeypatch, run):
        result = CliRunner().invoke(train_main, [shards, "--steps", "2", "--out", str(run), "--resume", *QUICK_TRAIN])
    one_line(result, f"cannot write to --out {run}", "rerun with --resume")
    assert (run / checkpoint.CHECKPOINT_NAME).read_bytes() == saved and leftovers(run) == []
    again = CliRunner().invoke(train_main, [shards, "--steps", "2", "--out", str(run), "--resume", *QUICK_TRAIN])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["step"] == 2


def test_eval_to_an_unwritable_report_or_test_shards_dir(tiny, tmp_path, monkeypatch):
    report, tests = unwritable_dir(tmp_path, "report"), unwritable_dir(tmp_path, "tests")
    args = ["--checkpoint", str(tiny), "--images-per-class", "1", "--baselines", "none", "--quiet"]
    with not_writable(monkeypatch, report):
        result = CliRunner().invoke(eval_main, [*args, "--report", str(report), "--test-shards", str(tmp_path / "t")])
    one_line(result, str(report), "writable")
    assert not (tmp_path / "t").exists(), "refused before the test shards are built"
    with not_writable(monkeypatch, tests):
        result = CliRunner().invoke(eval_main, [*args, "--report", str(tmp_path / "r"), "--test-shards", str(tests)])
    one_line(result, f"--test-shards {tests}", "writable")
    assert list(tests.iterdir()) == [] and list(report.iterdir()) == []
    again = CliRunner().invoke(eval_main, [*args, "--report", str(report), "--test-shards", str(tests)])
    assert again.exit_code == 0, again.output
    assert (report / "report.json").is_file() and (tests / "dataset.json").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command, args, product", [
    ("predict", ["a photograph of a star", "--classes", "star"], "prediction.json"),
    ("synth", ["--classes", "star", "--images-per-class", "1", "--batch", "1", "--quiet"], "synth.json"),
])
def test_predict_and_synth_to_an_unwritable_out(tiny, tmp_path, monkeypatch, command, args, product):
    main = {"predict": predict_main, "synth": synth_main}[command]
    out = unwritable_dir(tmp_path)
    args = ["--checkpoint", str(tiny), *args, "--out", str(out)]
    with not_writable(monkeypatch, out):
        result = CliRunner().invoke(main, args)
    one_line(result, str(out), "writable")
    assert list(out.iterdir()) == []
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (out / product).is_file() and leftovers(out) == []


def test_shards_show_and_merge_into_an_unwritable_dir(tiny, tmp_path, monkeypatch):
    out = unwritable_dir(tmp_path)
    png = out / "grid.png"
    with not_writable(monkeypatch, out):
        result = CliRunner().invoke(shards_main, ["show", str(tiny.parent / "set"), "--n", "2", "--out", str(png)])
    one_line(result, str(png), "writable")
    assert list(out.iterdir()) == []
    again = CliRunner().invoke(shards_main, ["show", str(tiny.parent / "set"), "--n", "2", "--out", str(png)])
    assert again.exit_code == 0 and png.is_file(), again.output

    copy = tmp_path / "set"
    shutil.copytree(tiny.parent / "set", copy)
    manifest = (copy / "dataset.json").read_bytes()
    with not_writable(monkeypatch, copy):
        result = CliRunner().invoke(shards_main, ["merge", str(copy)])
    line = one_line(result, str(copy), "make it writable", f"rerun iosd-shards merge {copy}")
    assert "--out" not in line, "merge writes in the set itself: no --out to pass"
    assert (copy / "dataset.json").read_bytes() == manifest and leftovers(copy) == []
    again = CliRunner().invoke(shards_main, ["merge", str(copy)])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["complete"] is True


# -- 2. a shard removed or truncated under a running trainer --------------------------------------
TRAIN = ["--batch-size", "2", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=64", "--head-option", "ffn=128", "--head-option", "visual_channels=[32,32,32]"]


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_shard_damaged_under_a_running_trainer(tiny, tmp_path, monkeypatch, damage):
    """2 shards of 4 samples, 2 a batch: steps 1-2 read the first shard, 3-4 the second. The
    second is damaged after the step-2 checkpoint, before the loader opens it."""
    shards = tmp_path / "set"
    shutil.copytree(tiny.parent / "set", shards)
    run = tmp_path / "run"
    args = [str(shards), "--steps", "4", "--save-every", "2", "--out", str(run), "--on-corrupt", "fail", *TRAIN]
    real_next, calls, hit = data.TrainLoader.next, [0], {}

    def next_then_damage(self, note):
        calls[0] += 1
        if calls[0] == 3:  # the step-2 checkpoint is on disk; the next batch comes from the second shard
            assert json.loads((run / checkpoint.CHECKPOINT_NAME).read_text())["step"] == 2
            path = Path(self.stream.url_at(1))
            hit["path"], hit["bytes"] = path, path.read_bytes()
            if damage == "removed":
                path.unlink()
            else:
                os.truncate(path, path.stat().st_size // 2)
        return real_next(self, note)

    monkeypatch.setattr(data.TrainLoader, "next", next_then_damage)
    result = CliRunner().invoke(train_main, args)
    monkeypatch.setattr(data.TrainLoader, "next", real_next)
    line = one_line(result, str(hit["path"]), f"iosd-shards verify {shards}", "iosd-gen", "rerun with --resume")
    assert ("missing" if damage == "removed" else "truncated") in line
    saved = json.loads((run / checkpoint.CHECKPOINT_NAME).read_text())
    assert saved["step"] == 2 and (run / saved["weights"] / checkpoint.MODEL_NAME).is_file(), "the last checkpoint is intact"
    assert leftovers(run) == []

    hit["path"].write_bytes(hit["bytes"])  # the shard restored (or regenerated: the same bytes)
    again = CliRunner().invoke(train_main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["step"] == 4


def test_a_tar_truncated_while_mapped_is_a_shard_error_not_sigbus(tiny, tmp_path):
    """A tar cut short after the loader mapped it: the next header is never read past the new
    end of the file (that would be SIGBUS, killing the process without a word)."""
    shard = tmp_path / "shard.tar"
    shutil.copy(sorted((tiny.parent / "set").glob("shard-*.tar"))[0], shard)
    samples = data.shard_samples(str(shard))
    next(samples)  # the tar is open and mapped
    os.truncate(shard, 1024)
    with pytest.raises(data.ShardError, match="truncated"):
        list(samples)
    assert stat.S_ISREG(shard.stat().st_mode)
