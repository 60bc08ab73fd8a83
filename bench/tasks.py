"""N independent ``iosd-gen --task I/N`` processes against one process, on the same shards.

Both runs generate the same set (the shapes world through the tiny SDXL, the CPU stand-in)
into their own directories: first one ``iosd-gen`` process, then ``--tasks`` processes
started together, each ``--task I/N`` (what a SLURM array, a Kubernetes Indexed Job or Ray
runs, here on one machine). Wall-clock time runs from the first start to the last exit, so
each task's start-up (imports, model load) counts against it, as it does under a scheduler.

Prints one JSON object: samples/s of each run and their ratio (tasks / one process, measured
in this run), whether every shard's bytes and the manifests' shard lists match, and the
per-task seconds. On a machine with fewer cores than tasks the ratio measures contention,
not scaling: ``OMP_NUM_THREADS`` is split between the tasks (``--split-threads``, the
default) so they do not oversubscribe the cores.

Run: ``python bench/tasks.py [--tasks 2] [--samples 64] [--shard-size 8]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iosd.errors import UserError, user_errors
from iosd.schema import MANIFEST_NAME

WORLD = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--quiet"]


def _tars(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.tar"))}


def _run(commands: list[list[str]], envs: list[dict]) -> tuple[float, list[float]]:
    """Start every command at once; wall seconds to the last exit, and each one's seconds."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c, e in zip(commands, envs, strict=True)]
    ends: list[float] = []
    for p in procs:
        out, err = p.communicate()
        ends.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise UserError(f"iosd-gen exited {p.returncode}: {(err or out).strip().splitlines()[-1:]}", "run the command alone to see why")
    return time.perf_counter() - t0, ends


def compare(tasks: int, samples: int, shard_size: int, workers: int, split_threads: bool, root: Path) -> dict:
    if any((root / name).exists() for name in ("one", "tasks")):
        raise UserError(f"{root} already holds a run (a rerun would resume, not generate)", "pass a new --out")
    base = [sys.executable, "-m", "iosd.pipeline.cli", *WORLD, "--num-samples", str(samples), "--shard-size", str(shard_size), "--workers", str(workers)]
    cpus = os.cpu_count() or 1
    env = dict(os.environ)
    one_s, _ = _run([[*base, "--out", str(root / "one")]], [env])
    per_task = dict(env)
    if split_threads:
        per_task["OMP_NUM_THREADS"] = str(max(1, (cpus - workers) // tasks))
    tasks_s, ends = _run([[*base, "--out", str(root / "tasks"), "--task", f"{i}/{tasks}"] for i in range(tasks)], [per_task] * tasks)
    one, many = _tars(root / "one"), _tars(root / "tasks")
    m_one = json.loads((root / "one" / MANIFEST_NAME).read_text())
    m_many = json.loads((root / "tasks" / MANIFEST_NAME).read_text())
    return {
        "case": f"{tasks}-tasks-vs-one-process",
        "cpus": cpus,
        "tasks": tasks,
        "samples": samples,
        "shards": len(one),
        "workers": workers,
        "task_omp_threads": per_task.get("OMP_NUM_THREADS"),
        "one_process": {"wall_s": round(one_s, 2), "samples_per_s": round(samples / one_s, 2)},
        "n_tasks": {"wall_s": round(tasks_s, 2), "samples_per_s": round(samples / tasks_s, 2), "task_exit_s": [round(e, 2) for e in ends]},
        "ratio_samples_per_s": round(one_s / tasks_s, 3),
        "bytes_identical": bool(one) and one == many,
        "manifest_shards_identical": m_one["shards"] == m_many["shards"] and m_many["complete"],
    }


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2, help="independent iosd-gen processes (--task I/N)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="iosd-gen's encode threads, per process")
    parser.add_argument("--split-threads", action=argparse.BooleanOptionalAction, default=True, help="OMP_NUM_THREADS = (cores - workers) / tasks for each task")
    parser.add_argument("--out", type=Path, default=None, help="keep both sets here [a temporary directory]")
    args = parser.parse_args()
    if args.tasks < 1:
        raise UserError(f"--tasks {args.tasks} is not a number of processes", "pass --tasks 2 or more")
    if args.out is not None:
        print(json.dumps(compare(args.tasks, args.samples, args.shard_size, args.workers, args.split_threads, args.out), indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(compare(args.tasks, args.samples, args.shard_size, args.workers, args.split_threads, Path(tmp)), indent=1))


if __name__ == "__main__":
    main()
