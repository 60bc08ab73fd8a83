"""``iosd-eval``: seen/unseen mIoU of a trained head against the teacher, next to DAAM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from iosd.choices import BASELINE_NAMES, TEACHER_NAMES, TEXT_TEACHERS
from iosd.errors import UserError, user_errors
from iosd.recipes import recipe_names
from iosd.verbosity import verbose_option

RECIPES = ", ".join(recipe_names())


def _resolve_run(checkpoint: str | None, runs_root: str) -> Path:
    from iosd.train.checkpoint import latest_run

    if checkpoint is not None:
        return Path(checkpoint)
    run = latest_run(runs_root)
    if run is None:
        raise UserError(f"no trained run under {runs_root}/", "train one with iosd-train SHARDS, or pass --checkpoint RUN")
    return run


def _check_split(info: dict, classes: str | None, split: int | None):
    from iosd.classes import ClassSplit, load_split

    trained = ClassSplit.from_json(info["classes"])
    if classes is None and split is None:
        return trained
    asked = load_split(trained.name if classes is None else classes, trained.split if split is None else split)
    if (asked.seen, asked.unseen) != (trained.seen, trained.unseen):
        raise UserError(f"the checkpoint was trained on {trained.name} split {trained.split}, not {asked.name} split {asked.split}", "drop --classes/--split to use the checkpoint's own split")
    return trained


def _labelled_test_set(test_shards: Path | str | None, objects: str) -> Path | str | None:
    """--test-shards that iosd-gen made from the user's own labelled images (--source coco:/folder:):
    scored as they are, never built or extended here; None for any other test set."""
    from iosd.manifest import read_manifest
    from iosd.pipeline.sources import LABELLED_SOURCES, source_kind
    from iosd.schema import MANIFEST_NAME
    from iosd.store import open_store

    if test_shards is None or open_store(test_shards).read_bytes(MANIFEST_NAME) is None:
        return None
    manifest = read_manifest(test_shards)
    source = str((manifest.get("config") or {}).get("source") or "")
    if source_kind(source) not in LABELLED_SOURCES:
        return None
    if objects != "1":
        raise UserError(f"{test_shards} holds your own images ({source}): they have no two-object prompt groups", "drop --objects 2")
    if not manifest.get("complete"):
        raise UserError(f"{test_shards} is incomplete", f"finish it by rerunning the iosd-gen --source {source} command that began it")
    return test_shards


def parse_baselines(text: str) -> list[str]:
    """--baselines as a list of known method names, refused in one line before any work."""
    names = [] if text.strip().lower() == "none" else list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BASELINE_NAMES]
    if unknown:
        raise UserError(f"unknown --baselines {', '.join(map(repr, unknown))}", f"use none or a comma-separated list of {', '.join(BASELINE_NAMES)}")
    return names


def _teacher_min_score(protocol, teacher: str | None, given: float | None) -> None:
    """A text-prompted teacher's scores are not Mask R-CNN's: its own min_score (teachers.json)
    is the ground-truth confidence unless --min-score is given."""
    if given is not None or teacher in (None, "mmdet"):
        return
    from iosd.pipeline.teachers import threshold_defaults

    setting = threshold_defaults(teacher)["min_score"]
    protocol.values["gt_min_score"] = setting["value"]
    protocol.origin["gt_min_score"].update(value=setting["value"], source=f"teacher {teacher}: {setting['source']}")


def _check_baselines(methods: list[str], gen: dict) -> None:
    """The baselines' model files (a CPU stand-in model's baselines are tiny, built offline)."""
    from iosd.pipeline.teachers import check_teacher_models
    from iosd.recipes import CPU_STAND_INS

    if gen.get("model") not in CPU_STAND_INS:
        for name in methods:
            if name != "daam":
                check_teacher_models(name, None)


def _baseline_teachers(methods: list[str], manifest: dict, device: str) -> dict:
    """The text-prompted baselines, built once: with their own defaults (teachers.json), tiny
    random-weight configs where the test set's model is a CPU stand-in; their files checked first."""
    from iosd.pipeline.teachers import build_teacher, options_from_config
    from iosd.recipes import CPU_STAND_INS

    gen = manifest.get("config") or {}
    tiny = gen.get("model") in CPU_STAND_INS
    wanted = [m for m in methods if m != "daam"]
    keep = {k: gen.get(k) for k in ("classes", "gt", "resolution")}
    if tiny:  # random weights: no confidence to threshold on, as the tiny teacher
        keep["score_thr"] = 0.0
    return {name: build_teacher(options_from_config({**keep, "teacher": name}, device, tiny=tiny)) for name in wanted}


def _protocol(info: dict, recipe: str | None, given: dict):
    """The evaluation settings: the recipe's (the checkpoint's own unless named), then the user's."""
    from iosd.recipes import FAST_RECIPE, check_recipe_layout, recipe_of, resolve

    own = recipe_of(info)
    name = recipe or own or FAST_RECIPE
    check_recipe_layout(name, own, [p for p, _ in info["layout"]["layers"]], "the checkpoint")
    return resolve(name, "eval", given, classes=(info.get("classes") or {}).get("name"))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", default=None, help=f"one of {RECIPES}: published protocol the options marked [recipe] default to [default: the checkpoint's]")
@click.option("--show-config", is_flag=True, help="print the resolved settings and where each comes from, then exit")
@click.option("--checkpoint", default=None, help="run directory of iosd-train [default: the most recent run under runs/]")
@click.option("--classes", default=None, help="class set; must match the checkpoint's [default: the checkpoint's]")
@click.option("--split", type=int, default=None, help="class split; must match the checkpoint's")
@click.option("--test-shards", default=None, help="test shard directory or object-store URL (s3://...) [default: beside the training shards, '<dir>-test', or '<dir>-test2' with --objects 2]; built when missing")
@click.option("--images-per-class", type=int, default=None, help="test images generated per class (with --objects 2: per class and prompt group) [recipe]")
@click.option("--objects", type=click.Choice(["1", "2"]), default="1", help="objects per test prompt; 2 scores GD's groups seen+seen, seen+unseen, unseen+unseen")
@click.option("--min-score", "gt_min_score", type=float, default=None, help="teacher confidence for a mask to count as ground truth [recipe]")
@click.option("--threshold", type=float, default=None, help="sigmoid threshold of the head's masks [recipe]")
@click.option("--report", "report_dir", default=None, type=click.Path(path_type=Path), help="report directory [default: RUN/eval-<test set>]")
@click.option("--baselines", default="daam", help=f"comma-separated methods scored beside the head: daam (cross-attention maps) and text-prompted segmenters applied straight to the test images ({', '.join(TEXT_TEACHERS)}); 'none' for the head alone")
@click.option("--teacher", type=click.Choice(TEACHER_NAMES), default=None, help="who labels the test shards' ground truth when they are built [default: the training shards' teacher]; a new teacher needs a new --test-shards")
@click.option("--batch-size", type=int, default=16)
@click.option("--device", default="auto")
@click.option("--runs", "runs_root", default="runs", help="where a bare iosd-eval looks for the latest run")
@click.option("--quiet", is_flag=True)
@verbose_option
@user_errors
def main(recipe, show_config, checkpoint, classes, split, test_shards, images_per_class, objects, gt_min_score, threshold, report_dir, baselines, teacher, batch_size, device, runs_root, quiet) -> None:
    """Score a head (and the DAAM baseline) on generated images of every seen and unseen class
    (50 each in the papers' protocol). Options marked [recipe] default to the recipe's value."""
    from rich.console import Console

    from iosd.evaluate.report import print_table, writable_dir, write_report
    from iosd.evaluate.scoring import score
    from iosd.evaluate.testset import check_compatible, ensure_test_shards
    from iosd.manifest import read_manifest
    from iosd.pipeline.models import pick_device
    from iosd.prechecks import check_writable
    from iosd.progress import stage_progress
    from iosd.schema import MANIFEST_NAME
    from iosd.store import base_name, is_remote, open_store
    from iosd.train.checkpoint import load_head

    console = Console(stderr=True)
    if test_shards is not None and not is_remote(test_shards):
        test_shards = Path(test_shards)
    run = _resolve_run(checkpoint, runs_root)
    dev = str(pick_device(device))
    head, info = load_head(run, dev)
    protocol = _protocol(info, recipe, {"images_per_class": images_per_class, "gt_min_score": gt_min_score, "threshold": threshold})
    _teacher_min_score(protocol, teacher or (info.get("generation") or {}).get("teacher"), gt_min_score)
    if show_config:
        from iosd.recipes import show_config as show_resolved

        show_resolved(protocol)
        return
    images_per_class, gt_min_score, threshold = (protocol.values[k] for k in ("images_per_class", "gt_min_score", "threshold"))
    if images_per_class <= 0 or batch_size <= 0:
        raise UserError("--images-per-class and --batch-size must be positive", "pass numbers > 0")
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold} is outside (0, 1)", "pass e.g. 0.5")
    if not 0 <= gt_min_score <= 1:
        raise UserError(f"--min-score {gt_min_score} is outside 0..1", "pass a teacher confidence, e.g. 0.8")
    split_ = _check_split(info, classes, split)
    methods = parse_baselines(baselines)
    _check_baselines(methods, info.get("generation") or {})
    if report_dir is not None:
        writable_dir(report_dir)
    else:  # RUN/eval-<test set>, written after scoring: refused now, before any model loads
        check_writable(run, "--report")
    test_dir = _labelled_test_set(test_shards, objects) or ensure_test_shards(info, test_shards, images_per_class, objects, dev, quiet, teacher=teacher)
    manifest = read_manifest(test_dir)
    if manifest.get("subset") not in (None, "all") and not quiet:
        console.print(f"[yellow]note:[/] {test_dir} holds only its {manifest['subset']} classes (iosd-gen --subset all makes a set that scores seen and unseen)")
    check_compatible(info, manifest, split_, test_dir)
    direct = _baseline_teachers(methods, manifest, dev)
    layers = [p for p, _ in info["layout"]["layers"]]
    total = manifest["counts"]["written"]
    with stage_progress(not quiet, total, str(test_dir), "scoring", console=console) as advance:  # a bar on a terminal, plain lines in a log
        scores = score(head, test_dir, [s["name"] for s in manifest["shards"]], layers, gt_min_score=gt_min_score, threshold=threshold, batch_size=batch_size, device=dev, progress=advance,
                       baselines=direct, with_daam="daam" in methods)
    results = {m: acc.summary(split_.seen, split_.unseen) for m, acc in scores.methods.items()}
    groups = scores.group_results(split_.seen, split_.unseen)
    provenance = {
        "checkpoint": {"run": str(run), "step": info.get("step"), "head": info["head"].get("kind"), "train_shards": info.get("shards")},
        "test_shards": {"dir": str(test_dir), "manifest_sha256": hashlib.sha256(open_store(test_dir).read_bytes(MANIFEST_NAME) or b"").hexdigest(), "images": total, "masks_meaningful": manifest.get("masks_meaningful"),
                        "source": (manifest.get("config") or {}).get("source")},
        "protocol": {"recipe": protocol.record(), "metric": protocol.values["metric"], "gt_min_score": gt_min_score, "threshold": threshold, "images_per_class": (manifest.get("config") or {}).get("images_per_class"), "objects": objects},
        "counts": {"images": scores.images, "filtered": scores.filtered, **({"group_images": scores.group_images} if groups else {})},
    }
    out = report_dir or (run / f"eval-{base_name(test_dir)}")
    provenance["baselines"] = {"methods": methods, **{m: t.describe() for m, t in direct.items()}}
    written = write_report(out, results, provenance, scores.examples, columns=("image", "teacher", "head", *methods), groups=groups)
    print_table(results, console=Console(), groups=groups)
    headline = {"per-image": "the mean per-image IoU pooled over each subset's images (IOSD)", "per-class": "the mean of per-class IoUs (GD)"}[protocol.values["metric"]]
    console.print(f"recipe {protocol.recipe}: its published number is {headline}")
    if not manifest.get("masks_meaningful", True):
        console.print("[yellow]note:[/] the teacher of these test shards has random weights: its masks are meaningless")
    click.echo(json.dumps({"report": str(written["json"]), "markdown": str(written["md"])}))


if __name__ == "__main__":
    main()
