"""Every file iosd writes gets the mode any other tool's output gets: 0o666 less the umask."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest
import torch

from iosd import manifest as manifest_module
from iosd.evaluate.metrics import IoUAccumulator
from iosd.evaluate.report import write_report
from iosd.manifest import current_umask, write_json_atomic
from iosd.pipeline.writer import WIDS_INDEX_NAME, ShardSetWriter
from iosd.schema import MANIFEST_NAME
from iosd.train.checkpoint import CHECKPOINT_NAME, save_checkpoint


@pytest.fixture
def umask():
    """Set the process umask for a test and put the old one back."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def results() -> dict:
    acc = IoUAccumulator()
    target = np.eye(8, dtype=bool)
    acc.update("cat", target, target)
    return {"head": acc.summary(["cat"], [])}


def write_everything(root) -> list:
    """A manifest (and wids index), a checkpoint and a report, as the commands write them."""
    header = {"identity": {"seed": 0}, "features": {"layers": [], "dtype": "float16"}}
    shards = root / "shards"
    ShardSetWriter(shards, header, 1).prepare()
    run = root / "run"
    save_checkpoint(run, torch.nn.Linear(2, 2), {"step": 1})
    report = write_report(root / "report", results(), {"checkpoint": {"path": "x"}})
    weights = sorted((run / "checkpoints").glob("step-*/*.safetensors"))
    assert weights  # safetensors writes 0o600 on its own
    return [shards / MANIFEST_NAME, shards / WIDS_INDEX_NAME, run / CHECKPOINT_NAME, *weights, report["json"], report["md"], report["chart"]]


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(umask, tmp_path, mask, expected):
    umask(mask)
    for path in write_everything(tmp_path):
        assert mode(path) == expected, (path.name, oct(mode(path)))


def test_umask_is_read_without_changing_it(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027
    # where /proc does not show it: set and restored, under the lock
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError("no /proc here")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was
    assert isinstance(manifest_module._UMASK_LOCK, type(threading.Lock()))


def test_atomic_write_leaves_no_temp_file_and_replaces_the_mode(umask, tmp_path):
    target = tmp_path / "x.json"
    target.write_text("{}")
    target.chmod(0o600)
    umask(0o022)
    write_json_atomic(target, {"a": 1})
    assert mode(target) == 0o644 and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
