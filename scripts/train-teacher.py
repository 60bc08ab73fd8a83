#!/usr/bin/env python
"""Train the CPU world's Mask R-CNN teacher and write it where ``--teacher-config <name>`` finds it.

    python scripts/train-teacher.py                                  # iosd/data/teachers/world-maskrcnn
    python scripts/train-teacher.py --steps 300 --out runs/teacher-smoke --eval-scenes 200
    python scripts/train-teacher.py --eval-only --eval-scenes 500    # mask AP of the shipped one

Deterministic from --seed; killed and rerun with the same arguments, it resumes from the last
checkpoint in --work (saved every --save-every steps) and reaches the same weights. After
training it scores the teacher's mask AP (pycocotools COCOeval, segm) on --eval-scenes
held-out scenes with exact masks and prints one JSON line. See train/world_teacher.py and
iosd/world_teachers.py.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

from iosd.errors import UserError, user_errors
from iosd.world_teachers import CONFIG_FILE, RECORD, TEACHERS, rebuild_command, teacher_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--name", type=click.Choice(list(TEACHERS)), default=TEACHERS[0])
@click.option("--seed", type=int, default=0)
@click.option("--steps", type=int, default=2000)
@click.option("--batch-size", type=int, default=8)
@click.option("--lr", type=float, default=1e-3)
@click.option("--side", type=int, default=128, help="px the world's 64 px scenes are upscaled to (train and test)")
@click.option("--width", type=int, default=16, help="ResNet-18 base channels")
@click.option("--fpn", type=int, default=64, help="FPN / RPN / RoI head channels")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: iosd/data/teachers/<name>, where --teacher-config <name> loads it]")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="checkpoints for resuming [default: runs/train-teacher/<out name>-seed<seed>]")
@click.option("--save-every", type=int, default=100)
@click.option("--stop-after", type=int, default=None, help="end this run after that many steps (saved; rerun without it to continue)")
@click.option("--eval-scenes", type=int, default=500, help="held-out scenes scored after training (0: none)")
@click.option("--eval-seed", type=int, default=1, help="seed of the held-out scenes' stream")
@click.option("--eval-only", is_flag=True, help="only score the teacher already in --out")
@click.option("--threads", type=int, default=None, help="torch threads [default: torch's]")
@click.option("--quiet", is_flag=True)
@user_errors(kept="checkpoints are kept")
def main(name, seed, steps, batch_size, lr, side, width, fpn, out, work, save_every, stop_after, eval_scenes, eval_seed, eval_only, threads, quiet):
    import torch

    from iosd.train.world_teacher import TeacherConfig, train_teacher

    if threads:
        torch.set_num_threads(threads)
    out = out or teacher_dir(name)
    started = time.perf_counter()
    summary: dict = {"teacher": name, "out": str(out)}
    if not eval_only:
        cfg = TeacherConfig(seed=seed, steps=steps, batch_size=batch_size, lr=lr, side=side, width=width, fpn=fpn, save_every=save_every)
        work = work or Path("runs/train-teacher") / f"{out.name}-seed{seed}"
        log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
        record = train_teacher(cfg, out, work, show=not quiet, log=log, stop_after=stop_after)
        if record.get("stopped"):
            print(json.dumps({**summary, "stopped_at_step": record["steps"], "work": str(work)}))
            return
        summary.update(seed=seed, steps=steps, final_loss=record["training"]["final_loss"], bytes=record["bytes"], wall_seconds_train=round(time.perf_counter() - started, 1))
    if eval_only and not (out / RECORD).is_file():
        raise UserError(f"no trained teacher in {out} ({RECORD} not found)", "train it first with `" + rebuild_command(name) + (f" --out {out}" if out != teacher_dir(name) else "") + "`")
    if eval_scenes > 0:
        from iosd.evaluate.teacher_ap import evaluate_teacher
        from iosd.pipeline.teacher import build_teacher

        teacher = build_teacher(str(out / CONFIG_FILE))
        summary["mask_ap"] = evaluate_teacher(teacher, eval_seed, eval_scenes)
    summary.update(wall_seconds=round(time.perf_counter() - started, 1), peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
