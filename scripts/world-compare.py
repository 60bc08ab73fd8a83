#!/usr/bin/env python
"""The papers' comparisons in miniature, on the trained world, with iosd's own commands.

Each arm is one set of iosd-gen / iosd-train options. For every arm: training shards once
(`iosd-gen --source shapes`), a head per training seed (`iosd-train --seed S`), and each head
scored by `iosd-eval` on one-object prompts and on two-object prompts per group (GD's Table 1),
next to DAAM. Prints one JSON line per arm (mean and spread over seeds) and a Markdown table.

    python scripts/world-compare.py                                  # every arm, 3 seeds
    python scripts/world-compare.py --arms head,blind --seeds 0,1,2
    python scripts/world-compare.py --arms head --seeds 0 --quick    # a smaller run

Arms (docs/cpu-world.md):
  head          the trained world, `fast` recipe, one- and two-object training prompts (mix)
  objects-1     the same with one-object training prompts only (`fast`'s published default)
  first-token   queries from the first token of the bare name (IOSD) instead of the mean
  negative      IOSD's negative-class prompts: two objects, only the query supervised
  blind         a generator trained without the unseen classes (IOSD_WORLDS_DIR=--blind-worlds)
  random        the random-weight tiny SDXL of the same classes (no semantics at all)
  teacher       `head`'s scenes labelled by the trained world teacher (--labels teacher) instead
                of exact masks, no filter: a real detector's mistakes
  teacher-0.8   the same through IOSD's 0.8 confidence filter (--min-score 0.8)
  teacher-top   the same with the top instance per class (--gt top, IOSD's) instead of the union
  diffusion     the papers' own path: images the world generates (--source diffusion, 25 steps,
                guidance 4), labelled by the trained world teacher, no filter; features from
                the re-noised pass (t = 50) as for rendered scenes; scored on `head`'s exact-mask
                test sets (run `head` first)
  diffusion-0.8 the same through IOSD's 0.8 confidence filter (`fast`'s --min-score)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from iosd.errors import UserError, user_errors

BASE_GEN = ["--classes", "shapes", "--split", "1", "--recipe", "fast", "--shard-size", "100", "--batch-size", "16"]
TEACHER_LABELS = ["--labels", "teacher", "--teacher-config", "world-maskrcnn"]  # the shipped CPU-world Mask R-CNN
SHAPES = ["--source", "shapes"]
# the world's samples as the papers make them: a sampler the world was trained for (not Turbo's one step)
DIFFUSION = ["--source", "diffusion", "--model", "world-sdxl", "--objects", "mix", "--steps", "25", "--guidance", "4", "--feature-t", "50", "--teacher-config", "world-maskrcnn"]
ARMS: dict[str, dict] = {
    "head": {"gen": ["--model", "world-sdxl", "--objects", "mix"]},
    "objects-1": {"gen": ["--model", "world-sdxl", "--objects", "1"]},
    "first-token": {"gen": ["--model", "world-sdxl", "--objects", "mix", "--query-template", "{}", "--query-pooling", "first"]},
    "negative": {"gen": ["--model", "world-sdxl", "--objects", "2", "--negative"]},
    "blind": {"gen": ["--model", "world-sdxl", "--objects", "mix"], "blind": True},
    "random": {"gen": ["--model", "tiny", "--resolution", "64", "--objects", "mix"]},
    "teacher": {"gen": ["--model", "world-sdxl", "--objects", "mix", *TEACHER_LABELS, "--min-score", "0"]},
    "teacher-0.8": {"gen": ["--model", "world-sdxl", "--objects", "mix", *TEACHER_LABELS, "--min-score", "0.8"]},
    "teacher-top": {"gen": ["--model", "world-sdxl", "--objects", "mix", *TEACHER_LABELS, "--min-score", "0.8", "--gt", "top"]},
    "diffusion": {"gen": [*DIFFUSION, "--min-score", "0"], "source": "diffusion", "test": "head"},
    "diffusion-0.8": {"gen": [*DIFFUSION, "--min-score", "0.8"], "source": "diffusion", "test": "head"},
}
GROUPS = ("seen+seen", "seen+unseen", "unseen+unseen")


def _run(args: list[str], env: dict, log: Path) -> None:
    """One iosd command; its output goes to ``log``, a failure ends the comparison in one line."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(args)}\n")
        f.flush()
        done = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise UserError(f"`{' '.join(args)}` failed with exit code {done.returncode}", f"see {log}")


def _scores(report: Path) -> dict:
    data = json.loads((report / "report.json").read_text())
    out = {}
    for method, summary in data["methods"].items():
        out[f"{method}/seen"] = summary["seen"]["miou"]
        out[f"{method}/unseen"] = summary["unseen"]["miou"]
    for group, per in data.get("groups", {}).items():
        for method, summary in per.items():
            for subset in ("seen", "unseen"):
                if summary[subset]["miou"] is not None and summary[subset]["classes"]:
                    out[f"{group}/{method}/{subset}"] = summary[subset]["miou"]
            if group == "unseen+unseen":
                out[f"{group}/{method}/worst_class"] = min(r["iou"] for r in summary["per_class"].values() if r["subset"] == "unseen" and r["iou"] is not None)
    return out


def _spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0, "n": len(values)}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
@click.option("--seeds", default="0,1,2", help="head training seeds")
@click.option("--samples", type=int, default=1600, help="training samples per arm")
@click.option("--steps", type=int, default=1000, help="head training steps")
@click.option("--images-per-class", type=int, default=20)
@click.option("--blind-worlds", default="runs/worlds-blind", help="IOSD_WORLDS_DIR of the blind arm: a world-sdxl trained with --exclude <unseen classes>")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/world-compare"))
@click.option("--gen-args", default="", help="extra iosd-gen options for every arm, e.g. '--feature-t 300'")
@click.option("--quick", is_flag=True, help="400 samples, 300 steps, 6 images per class: checks the machinery, not the numbers")
@user_errors(kept="finished runs are kept")
def main(arms: str, seeds: str, samples: int, steps: int, images_per_class: int, blind_worlds: str, out: Path, gen_args: str, quick: bool) -> None:
    if quick:
        samples, steps, images_per_class = 400, 300, 6
    names = [a for a in arms.split(",") if a]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}", f"choose from {', '.join(ARMS)}")
    seed_list = [int(s) for s in seeds.split(",")]
    bin_dir = Path(sys.executable).parent
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for arm in names:
        spec = ARMS[arm]
        env = dict(os.environ)
        if spec.get("blind"):
            if not (Path(blind_worlds) / "world-sdxl" / "world.json").exists():
                raise UserError(f"the blind world is missing under {blind_worlds}", f"python scripts/train-world.py --world world-sdxl --exclude star,heart,hexagon --out {blind_worlds}/world-sdxl")
            env["IOSD_WORLDS_DIR"] = str(Path(blind_worlds).resolve())
        tests = {}
        if spec.get("test"):  # exact-mask test sets another arm built
            tests = {o: out / "shards" / f"{spec['test']}-test{'' if o == '1' else o}" for o in ("1", "2")}
            missing = [str(t) for t in tests.values() if not (t / "dataset.json").exists()]
            if missing:
                raise UserError(f"arm {arm} is scored on arm {spec['test']}'s exact-mask test sets, missing: {', '.join(missing)}", f"run --arms {spec['test']},{arm} (in that order) with the same --out")
        log = out / f"{arm}.log"
        shards = out / "shards" / arm
        started = time.perf_counter()
        source = [] if spec.get("source") else SHAPES
        _run([str(bin_dir / "iosd-gen"), *BASE_GEN, *source, *spec["gen"], *gen_args.split(), "--num-samples", str(samples), "--out", str(shards), "--quiet"], env, log)
        per_seed = []
        for seed in seed_list:
            run = out / "runs" / f"{arm}-seed{seed}"
            _run([str(bin_dir / "iosd-train"), str(shards), "--seed", str(seed), "--steps", str(steps), "--out", str(run), "--quiet", "--no-tensorboard", *(["--resume"] if (run / "checkpoint.json").exists() else [])], env, log)
            scores = {}
            for objects in ("1", "2"):
                report = out / "reports" / f"{arm}-seed{seed}-objects{objects}"
                _run([str(bin_dir / "iosd-eval"), "--checkpoint", str(run), "--objects", objects, "--images-per-class", str(images_per_class), "--report", str(report), "--quiet", *(["--test-shards", str(tests[objects])] if tests else [])], env, log)
                scores.update({(f"{k}" if objects == "2" else f"one/{k}"): v for k, v in _scores(report).items()})
            per_seed.append(scores)
        keys = sorted(set().union(*per_seed))
        rows[arm] = {k: _spread([s[k] for s in per_seed if s.get(k) is not None]) for k in keys}
        rows[arm]["minutes"] = round((time.perf_counter() - started) / 60, 1)
        print(json.dumps({"arm": arm, "seeds": seed_list, **rows[arm]}), flush=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))


def markdown(rows: dict) -> str:
    """The table docs/cpu-world.md shows: mIoU in % (the head's mean ± spread over its seeds)."""
    cols = [("one/head/seen", "head seen"), ("one/head/unseen", "head unseen"), ("one/daam/seen", "DAAM seen"), ("one/daam/unseen", "DAAM unseen"),
            ("seen+seen/head/seen", "S+S head"), ("seen+unseen/head/seen", "S+U head seen"), ("seen+unseen/head/unseen", "S+U head unseen"),
            ("unseen+unseen/head/unseen", "U+U head"), ("unseen+unseen/head/worst_class", "U+U worst class"), ("unseen+unseen/daam/unseen", "U+U DAAM")]
    lines = ["| arm | " + " | ".join(t for _, t in cols) + " |", "|---|" + "---:|" * len(cols)]
    for arm, row in rows.items():
        # DAAM has no head to train: one number per generator, the same for every head seed
        cells = [("-" if k not in row else f"{100 * row[k]['mean']:.1f}" if "daam" in k else f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}") for k, _ in cols]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
