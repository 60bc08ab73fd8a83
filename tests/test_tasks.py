"""Independent tasks (iosd-gen/iosd-synth --task I/N, a SLURM array, a Kubernetes Indexed Job,
submitit, Ray): the same shards as one process, a set-wide manifest from whichever task finds
the set complete or from ``iosd-shards merge``, and one valid copy when two tasks race."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.errors import UserError
from iosd.pipeline.cli import main as gen_main
from iosd.pipeline.shards_cli import main as shards_main
from iosd.pipeline.tasks import Task, parse_task, resolve_task, run_task
from iosd.pipeline.writer import PARTS_DIR, WIDS_INDEX_NAME, ShardSetWriter
from iosd.schema import MANIFEST_NAME

# make_shapes_set's defaults, as iosd-gen options (the session's shapes_set is one process of them)
GEN = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--num-samples", "12", "--shard-size", "4", "--batch-size", "4", "--quiet"]
OPTIONS = {"classes": "shapes", "source": "shapes", "model": "tiny", "num_samples": 12, "shard_size": 4, "quiet": True}  # the same, for run_task
SET_ENV = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "JOB_COMPLETION_INDEX", "IOSD_TASK_COUNT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No scheduler variables from the machine running the tests."""
    for name in SET_ENV:
        monkeypatch.delenv(name, raising=False)


def tars(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


# -- which task ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option, env, expected",
    [
        (None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "JOB_COMPLETION_INDEX": "1"}, Task()),  # a library caller
        ("auto", {}, Task()),
        ("1/4", {}, Task(1, 4, "--task 1/4")),
        ("1/4", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, Task(1, 4, "--task 1/4")),  # the option wins
        ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, Task(3, 8, "SLURM_ARRAY_TASK_ID=3 of SLURM_ARRAY_TASK_COUNT=8")),
        ("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "3"}, Task(2, 4, "SLURM_ARRAY_TASK_ID=5 of SLURM_ARRAY_TASK_COUNT=4 from SLURM_ARRAY_TASK_MIN=3")),
        ("auto", {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "2"}, Task(2, 3, "SLURM_ARRAY_TASK_ID=4 of SLURM_ARRAY_TASK_COUNT=3")),
        ("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "JOB_COMPLETION_INDEX": "0", "IOSD_TASK_COUNT": "5"}, Task(1, 2, "SLURM_ARRAY_TASK_ID=1 of SLURM_ARRAY_TASK_COUNT=2")),
        ("auto", {"JOB_COMPLETION_INDEX": "2", "IOSD_TASK_COUNT": "3"}, Task(2, 3, "JOB_COMPLETION_INDEX=2 of IOSD_TASK_COUNT=3")),
        ("3", {"JOB_COMPLETION_INDEX": "2"}, Task(2, 3, "JOB_COMPLETION_INDEX=2 of --task 3")),
        ("1", {}, Task()),
    ],
)
def test_task_from_option_then_slurm_then_kubernetes(option, env, expected):
    assert resolve_task(option, env) == expected


@pytest.mark.parametrize(
    "option, env, message",
    [
        ("4/4", {}, "the index must be in 0..3"),
        ("0/0", {}, "at least 1"),
        ("a/2", {}, "not an integer"),
        ("1/x", {}, "not an integer"),
        ("2", {}, "gives the number of tasks but no index"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, "set IOSD_TASK_COUNT to the Job's completions"),
        ("auto", {"JOB_COMPLETION_INDEX": "3", "IOSD_TASK_COUNT": "3"}, "is not one of 3 tasks"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT is not"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, "sbatch --array=0-N-1"),
        ("3", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, "says 3 tasks"),
    ],
)
def test_bad_task_values_are_one_line_naming_the_fix(option, env, message):
    with pytest.raises(UserError) as err:
        resolve_task(option, env)
    assert message in err.value.line() and err.value.fix and "\n" not in err.value.line()


def test_parse_and_ownership_partition_the_items():
    assert parse_task("2/5") == (2, 5) and parse_task("5") == (None, 5)
    # tasks split the items, torchrun ranks inside a task split its share again: each item once
    owners = [[(t, r) for t in range(3) for r in range(2) if Task(t, 3).owns(i, r, 2)] for i in range(24)]
    assert all(len(o) == 1 for o in owners) and len({o[0] for o in owners}) == 6


# -- three independent tasks = one process ------------------------------------------------------
@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory, shapes_set):
    """The session's one-process set made again as 3 tasks: --task on the command line, a SLURM
    array's environment, a Kubernetes Indexed Job's. Returns (out, manifests seen after each)."""
    out = tmp_path_factory.mktemp("tasks") / "set"
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        for name in SET_ENV:
            mp.delenv(name, raising=False)
        result = CliRunner().invoke(gen_main, [*GEN, "--out", str(out), "--task", "0/3"])
        assert result.exit_code == 0, result.output
        assert "note: task 0/3 (from --task 0/3): 1 of 3 shards" in result.stderr
        seen.append((manifest(out), json.loads(result.stdout.strip().splitlines()[-1])))
        mp.setenv("SLURM_ARRAY_TASK_ID", "8")  # sbatch --array=7-9: the second task
        mp.setenv("SLURM_ARRAY_TASK_MIN", "7")
        mp.setenv("SLURM_ARRAY_TASK_COUNT", "3")
        make_shapes_set(out, task="auto")  # what the CLIs pass
        seen.append((manifest(out), None))
        for name in SET_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("JOB_COMPLETION_INDEX", "2")
        mp.setenv("IOSD_TASK_COUNT", "3")
        make_shapes_set(out, task="auto")
        seen.append((manifest(out), None))
    return out, seen


def test_three_tasks_write_the_bytes_of_one_process(three_tasks, shapes_set):
    out, seen = three_tasks
    assert tars(out) == tars(shapes_set) and len(tars(out)) == 3
    ours, one = manifest(out), manifest(shapes_set)
    assert ours["complete"] and ours["shards"] == one["shards"] and ours["counts"] == one["counts"]
    assert {k for k in ours if ours[k] != one[k]} == {"config"}
    assert {k for k in ours["config"] if ours["config"][k] != one["config"][k]} == {"out"}
    assert "task" not in ours["config"] and "task" not in ours["identity"]
    # only the task that found the set complete wrote its shard list: before, dataset.json is the header
    assert [m["complete"] for m, _ in seen] == [False, False, True]
    assert seen[0][1]["complete"] is False and seen[0][1]["shards"] == 1  # the first task's own summary
    index = json.loads((out / WIDS_INDEX_NAME).read_text())
    assert [s["url"] for s in index["shardlist"]] == [s["name"] for s in one["shards"]]


def test_merge_is_idempotent_and_refuses_incomplete_sets(three_tasks, tmp_path):
    out = tmp_path / "set"
    shutil.copytree(three_tasks[0], out)
    before = {n: (out / n).read_bytes() for n in (MANIFEST_NAME, WIDS_INDEX_NAME)}
    for _ in range(2):
        result = CliRunner().invoke(shards_main, ["merge", str(out)])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == {"out": str(out), "shards": 3, "samples": 12, "bytes": sum(s["bytes"] for s in manifest(out)["shards"]), "complete": True}
        assert {n: (out / n).read_bytes() for n in before} == before
    # a lost task: merge names what is missing and how to make it, and writes nothing
    (out / PARTS_DIR / "shard-000001.json").unlink()
    (out / "shard-000002.tar").unlink()
    result = CliRunner().invoke(shards_main, ["merge", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "2 of 3 shards are missing (shard 1-2)" in result.output and "iosd-gen" in result.output
    assert {n: (out / n).read_bytes() for n in before} == before
    # the missing tasks rerun (task 1 as its own --task, task 2 resumed by a whole rerun): complete again
    assert run_task("1/3", **OPTIONS, out=str(out))["complete"] is False
    make_shapes_set(out)
    assert tars(out) == tars(three_tasks[0]) and manifest(out)["shards"] == json.loads(before[MANIFEST_NAME])["shards"]
    # not a shard set
    (tmp_path / "other").mkdir()
    result = CliRunner().invoke(shards_main, ["merge", str(tmp_path / "other")])
    assert result.exit_code == 2 and "has no dataset.json" in result.output


# -- races ----------------------------------------------------------------------------------------
def test_tasks_opening_one_directory_at_once_and_racing_on_one_shard_leave_one_valid_copy(shapes_set, tmp_path):
    from iosd.pipeline.tasks import COMPUTED

    HEADER = {k: v for k, v in manifest(shapes_set).items() if k not in COMPUTED}
    out = tmp_path / "set"
    # another task has made the directory and is about to write its first manifest
    (out / PARTS_DIR).mkdir(parents=True)
    (out / ".write-test-1-abcd").write_bytes(b"")
    writers = [ShardSetWriter(out, HEADER, 1) for _ in range(2)]
    for w in writers:
        w.prepare()
    (out / ".write-test-1-abcd").unlink()  # the other task's probe, gone once its prepare is done
    with pytest.raises(UserError, match="different config"):
        ShardSetWriter(out, {**HEADER, "identity": {**HEADER["identity"], "seed": 1}}, 1).prepare()
    # two tasks write shard 0 at the same time: both temp files exist before either is renamed
    barrier = threading.Barrier(2)
    members = [{"__key__": f"{k:06d}", "txt": b"x" * 5000} for k in range(3)]

    def samples():
        yield members[0]
        barrier.wait(timeout=10)
        yield from members[1:]

    records: list[dict] = []
    threads = [threading.Thread(target=lambda w=w: records.append(w.write_shard(0, samples(), {"written": 3}))) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(records) == 2 and records[0] == records[1]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, WIDS_INDEX_NAME, PARTS_DIR, "shard-000000.tar"])
    assert hashlib.sha256((out / "shard-000000.tar").read_bytes()).hexdigest() == records[0]["sha256"]
    assert writers[0].assemble()["complete"] and writers[1].done() == {0}


# -- schedulers that call Python functions -------------------------------------------------------


def test_submitit_local_executor_gives_the_same_shards(shapes_set, tmp_path):
    submitit = pytest.importorskip("submitit")
    out = tmp_path / "set"
    executor = submitit.LocalExecutor(folder=tmp_path / "logs")
    executor.update_parameters(timeout_min=5)
    jobs = executor.map_array(functools.partial(run_task, **OPTIONS, out=str(out)), [f"{i}/2" for i in range(2)])
    results = [job.result() for job in jobs]
    assert sorted(r["task"] for r in results) == ["0/2", "1/2"] and any(r["complete"] for r in results)
    assert tars(out) == tars(shapes_set) and manifest(out)["shards"] == manifest(shapes_set)["shards"]


def test_ray_tasks_give_the_same_shards(shapes_set, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "set"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(run_task)
        results = ray.get([remote.remote(f"{i}/2", **OPTIONS, out=str(out)) for i in range(2)])
    finally:
        ray.shutdown()
    assert sorted(r["task"] for r in results) == ["0/2", "1/2"] and any(r["complete"] for r in results)
    assert tars(out) == tars(shapes_set) and manifest(out)["shards"] == manifest(shapes_set)["shards"]


# -- iosd-synth: chunks by index, like iosd-gen's shards -----------------------------------------
def test_synth_as_two_tasks_writes_the_files_of_one_process(tmp_path, monkeypatch):
    from conftest import make_tiny_run

    from iosd.export_layout import REPORT
    from iosd.pipeline.synth_cli import main as synth_main

    run = make_tiny_run(tmp_path / "train", steps=2)
    args = ["--checkpoint", str(run), "--classes", "disc,star", "--images-per-class", "2", "--chunk-size", "2", "--batch", "2", "--quiet"]
    one = CliRunner().invoke(synth_main, [*args, "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    out = tmp_path / "tasks"
    first = CliRunner().invoke(synth_main, [*args, "--out", str(out), "--task", "0/2"])
    assert first.exit_code == 0 and not (out / REPORT).exists(), first.output
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("IOSD_TASK_COUNT", "2")
    last = CliRunner().invoke(synth_main, [*args, "--out", str(out)])
    assert last.exit_code == 0, last.output
    assert json.loads(last.stdout.strip().splitlines()[-1]) == json.loads(one.stdout.strip().splitlines()[-1]) | {"out": str(out)}
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for path in files:
        assert (out / path).read_bytes() == (tmp_path / "one" / path).read_bytes(), path


def test_projected_tasks_share_the_first_basis_stored_and_match_one_process(tmp_path):
    """--project with tasks on disk: whichever task stores the basis first, every task uses it,
    and the shards are those of one process (tests/test_object_store.py: the same in s3)."""
    args = [*GEN, "--project", "8", "--calibration-samples", "4"]
    one, split = tmp_path / "one", tmp_path / "split"
    assert CliRunner().invoke(gen_main, [*args, "--out", str(one)]).exit_code == 0
    for task in ("1/2", "0/2"):  # the second task first: any task may fit it
        result = CliRunner().invoke(gen_main, [*args, "--out", str(split), "--task", task])
        assert result.exit_code == 0, result.output
    assert tars(split) == tars(one) and manifest(split)["complete"]
    assert (split / "projection.safetensors").read_bytes() == (one / "projection.safetensors").read_bytes()
    assert manifest(split)["features"]["projection"] == manifest(one)["features"]["projection"]
