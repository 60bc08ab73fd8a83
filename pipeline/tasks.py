"""Which share of the work this process owns: ``--task I/N``, a scheduler's array index, or torchrun.

Work (iosd-gen's shards, iosd-synth's chunks) is split by index: item ``i`` belongs to task
``i % N``. Independent tasks never talk to each other (no process group): a SLURM job array,
a Kubernetes Indexed Job or Ray tasks run the same command with different indices, and
whichever task finds every item's record present assembles the set-wide files. Under torchrun
each task may itself be a process group; its ranks then split the task's share again.

Where the index comes from, first found wins:

1. ``--task I/N`` (or ``--task N``: N tasks, the index from the environment below);
2. ``SLURM_ARRAY_TASK_ID`` (less ``SLURM_ARRAY_TASK_MIN``, over ``SLURM_ARRAY_TASK_STEP``)
   with ``SLURM_ARRAY_TASK_COUNT``;
3. ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job) with ``IOSD_TASK_COUNT`` (the Job's
   ``completions``: Kubernetes does not pass it to the pod) or ``--task N``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from iosd.errors import UserError, storage_error

TASK_COUNT_ENV = "IOSD_TASK_COUNT"
SLURM_ID, SLURM_COUNT, SLURM_MIN, SLURM_STEP = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"
K8S_INDEX = "JOB_COMPLETION_INDEX"
AUTO = "auto"  # the CLIs' default: a scheduler's index when one is set, else one task
TASK_HELP = "this process's share: task I of N (0-based) owns items i with i % N == I; N alone, or auto, take I (and N) from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX; auto without them: one task"


@dataclass(frozen=True)
class Task:
    """Task ``index`` of ``count`` independent tasks, and where that was read (None: one process)."""

    index: int = 0
    count: int = 1
    source: str | None = None

    def owns(self, item: int, rank: int = 0, world: int = 1) -> bool:
        """Whether this task's torchrun ``rank`` of ``world`` makes item ``item``: the tasks
        split the items, then the ranks split the task's share (one residue each)."""
        return item % (self.count * world) == self.index * world + rank

    def label(self) -> str:
        return f"{self.index}/{self.count}"


def _int(text: str, what: str, fix: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise UserError(f"{what} is {text!r}, not an integer", fix) from None


def parse_task(text: str) -> tuple[int | None, int]:
    """``"I/N"`` -> (I, N); ``"N"`` -> (None, N): the index is left to the environment."""
    fix = "pass --task I/N with 0 <= I < N, e.g. --task 0/4"
    index_text, sep, count_text = text.partition("/")
    if not sep:
        index, count = None, _int(text, f"--task {text!r}", fix)
    else:
        index, count = _int(index_text, f"--task {text!r}: the index", fix), _int(count_text, f"--task {text!r}: the count", fix)
    if count < 1:
        raise UserError(f"--task {text}: the number of tasks must be at least 1", fix)
    if index is not None and not 0 <= index < count:
        raise UserError(f"--task {text}: the index must be in 0..{count - 1}", fix)
    return index, count


def resolve_task(option: str | None, env: Mapping[str, str] | None = None) -> Task:
    """This process's task from ``--task`` and the environment (see the module docstring).
    None is one process whatever the environment: a library caller (iosd-eval building its
    test shards inside someone's array job) never takes a share by accident; the CLIs pass
    ``"auto"`` unless told otherwise."""
    if option is None:
        return Task()
    env = os.environ if env is None else env
    index, count = parse_task(option) if option != AUTO else (None, None)
    if index is not None:
        return Task(index, count, f"--task {option}")
    if env.get(SLURM_ID, "").strip():
        fix = "run it as a job array (sbatch --array=0-N-1), or pass --task I/N"
        raw = _int(env[SLURM_ID], SLURM_ID, fix)
        low = _int(env.get(SLURM_MIN) or "0", SLURM_MIN, fix)
        step = _int(env.get(SLURM_STEP) or "1", SLURM_STEP, fix)
        if SLURM_COUNT not in env and count is None:
            raise UserError(f"{SLURM_ID} is set but {SLURM_COUNT} is not", "pass --task N with N the array's size, or --task I/N")
        given = _int(env[SLURM_COUNT], SLURM_COUNT, fix) if SLURM_COUNT in env else count
        if count is not None and count != given:
            raise UserError(f"--task {option} says {count} tasks but {SLURM_COUNT} is {given}", "pass --task with the array's size, or leave it out")
        index = (raw - low) // max(step, 1)
        if given < 1 or not 0 <= index < given or (raw - low) % max(step, 1):
            raise UserError(f"{SLURM_ID}={raw} is not one of {given} array tasks from {low} in steps of {step}", "submit with sbatch --array=0-N-1, or pass --task I/N")
        return Task(index, given, f"{SLURM_ID}={raw} of {SLURM_COUNT}={given}" + (f" from {SLURM_MIN}={low}" if low else ""))
    if env.get(K8S_INDEX, "").strip():
        index = _int(env[K8S_INDEX], K8S_INDEX, "run it as a Kubernetes Indexed Job, or pass --task I/N")
        where = f"--task {option}"
        if count is None:
            if not env.get(TASK_COUNT_ENV, "").strip():
                raise UserError(f"{K8S_INDEX} is set but not the number of tasks", f"set {TASK_COUNT_ENV} to the Job's completions, or pass --task N")
            count, where = _int(env[TASK_COUNT_ENV], TASK_COUNT_ENV, f"set {TASK_COUNT_ENV} to the Job's completions"), f"{TASK_COUNT_ENV}={env[TASK_COUNT_ENV].strip()}"
        if count < 1 or not 0 <= index < count:
            raise UserError(f"{K8S_INDEX}={index} is not one of {count} tasks ({where})", f"set {TASK_COUNT_ENV} (or --task N) to the Job's completions")
        return Task(index, count, f"{K8S_INDEX}={index} of {where}")
    if count is not None and count > 1:
        raise UserError(f"--task {option} gives the number of tasks but no index, and neither {SLURM_ID} nor {K8S_INDEX} is set", f"pass --task I/{count}")
    return Task()


def task_note(task: Task, what: str, owned: int, total: int) -> None:
    """Say on stderr which task this is and where that came from (a scheduler's log shows it)."""
    if task.source is not None:
        print(f"note: task {task.label()} (from {task.source}): {owned} of {total} {what} are this task's (i % {task.count} == {task.index})", file=sys.stderr)


def spans(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``: a missing-shard list a person can read."""
    out: list[str] = []
    for i in indices:
        if out and int(out[-1].rsplit("-", 1)[-1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


# dataset.json's fields computed from the records; the rest is the header the tasks share
COMPUTED = ("schema_version", "iosd_version", "counts", "shards", "planned_shards", "complete")


def merge_set(directory: str | os.PathLike) -> dict:
    """``iosd-shards merge``: dataset.json and wids-index.json of a shard set written by
    independent tasks, from every shard's record, when each planned shard is there. The same
    bytes the last task writes, so running it again (or after a task did) changes nothing.
    Returns a short summary; an incomplete set is a UserError naming the missing shards."""
    from pathlib import Path

    from iosd.manifest import read_manifest
    from iosd.pipeline.writer import PARTS_DIR, ShardSetWriter
    from iosd.store import is_remote

    out = str(directory).rstrip("/") if is_remote(directory) else Path(directory)  # a URL: the tasks wrote to an object store
    manifest = read_manifest(out)
    not_a_set = UserError(f"{out} is not a shard set written by iosd-gen (no per-shard records)", "point at an iosd-gen --out directory")
    if manifest.get("kind") != "iosd-shards":
        raise not_a_set
    header = {k: v for k, v in manifest.items() if k not in COMPUTED}
    planned = int(manifest["planned_shards"])
    writer = ShardSetWriter(out, header, planned)
    if not writer.store.names(PARTS_DIR, ".json"):
        raise not_a_set
    recs = writer.records()
    missing = writer.missing(recs)
    if missing:
        raise UserError(
            f"{out} is incomplete: {len(missing)} of {planned} shards are missing (shard {spans(missing)})",
            f"rerun the iosd-gen command that wrote it (its settings: iosd-shards info {out}), alone or as its tasks (shard s is task s % N's), then merge again",
        )
    try:
        merged = writer.write_manifest(recs)
    except OSError as err:  # the set's own directory: no --out to pass elsewhere
        line = storage_error(err, f"then rerun iosd-shards merge {out}", elsewhere=None)
        if line is None:
            raise
        raise line from None
    return {"out": str(out), "shards": len(merged["shards"]), "samples": sum(s["samples"] for s in merged["shards"]), "bytes": sum(s["bytes"] for s in merged["shards"]), "complete": merged["complete"]}


def run_task(task: str, **options: object) -> dict:
    """iosd-gen as one task from Python, for a scheduler that calls functions (submitit, Ray):
    ``options`` are ``GenConfig``'s (iosd-gen's options, underscored); returns a short,
    picklable summary. The process holds no process group, like ``iosd-gen --task``."""
    from iosd.pipeline.generate import GenConfig, generate

    manifest, _ = generate(GenConfig(**options, task=task))  # type: ignore[arg-type]
    counts = manifest.get("counts", {})
    return {"out": manifest["config"]["out"], "task": task, "shards": len(manifest["shards"]), "written": counts.get("written", 0), "complete": manifest["complete"]}
