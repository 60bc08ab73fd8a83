"""``iosd-eval``: seen/unseen mIoU of a trained head against the teacher, next to DAAM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click

from iosd.errors import UserError, user_errors


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", default=None, help="run directory of iosd-train [default: the most recent run under runs/]")
@click.option("--classes", default=None, help="class set; must match the checkpoint's [default: the checkpoint's]")
@click.option("--split", type=int, default=None, help="class split; must match the checkpoint's")
@click.option("--test-shards", default=None, type=click.Path(path_type=Path), help="test shard directory [default: beside the training shards, '<dir>-test', or '<dir>-test2' with --objects 2]; built when missing")
@click.option("--images-per-class", type=int, default=50, help="test images generated per class (with --objects 2: per class and prompt group)")
@click.option("--objects", type=click.Choice(["1", "2"]), default="1", help="objects per test prompt; 2 scores GD's groups seen+seen, seen+unseen, unseen+unseen")
@click.option("--min-score", "gt_min_score", type=float, default=0.8, help="teacher confidence for a mask to count as ground truth (IOSD)")
@click.option("--threshold", type=float, default=0.5, help="sigmoid threshold of the head's masks")
@click.option("--report", "report_dir", default=None, type=click.Path(path_type=Path), help="report directory [default: RUN/eval-<test set>]")
@click.option("--batch-size", type=int, default=16)
@click.option("--device", default="auto")
@click.option("--runs", "runs_root", default="runs", help="where a bare iosd-eval looks for the latest run")
@click.option("--quiet", is_flag=True)
@user_errors
def main(checkpoint, classes, split, test_shards, images_per_class, objects, gt_min_score, threshold, report_dir, batch_size, device, runs_root, quiet) -> None:
    """Score a head (and the DAAM baseline) on 50 generated images per seen and unseen class."""
    from rich.console import Console

    from iosd.evaluate.report import print_table, writable_dir, write_report
    from iosd.evaluate.scoring import score
    from iosd.evaluate.testset import check_compatible, ensure_test_shards
    from iosd.manifest import read_manifest
    from iosd.pipeline.models import pick_device
    from iosd.schema import MANIFEST_NAME
    from iosd.train.checkpoint import load_head

    if images_per_class <= 0 or batch_size <= 0:
        raise UserError("--images-per-class and --batch-size must be positive", "pass numbers > 0")
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold} is outside (0, 1)", "pass e.g. 0.5")
    console = Console(stderr=True)
    run = _resolve_run(checkpoint, runs_root)
    dev = str(pick_device(device))
    head, info = load_head(run, dev)
    split_ = _check_split(info, classes, split)
    if report_dir is not None:
        writable_dir(report_dir)
    test_dir = ensure_test_shards(info, test_shards, images_per_class, objects, dev, quiet)
    manifest = read_manifest(test_dir)
    check_compatible(info, manifest, split_, test_dir)
    layers = [p for p, _ in info["layout"]["layers"]]
    total = manifest["counts"]["written"]
    if quiet:
        scores = score(head, test_dir, [s["name"] for s in manifest["shards"]], layers, gt_min_score=gt_min_score, threshold=threshold, batch_size=batch_size, device=dev)
    else:
        from rich.progress import Progress

        with Progress(console=console) as bar:
            task = bar.add_task("scoring", total=total)
            scores = score(head, test_dir, [s["name"] for s in manifest["shards"]], layers, gt_min_score=gt_min_score, threshold=threshold, batch_size=batch_size, device=dev, progress=lambda n: bar.advance(task, n))
    results = {m: acc.summary(split_.seen, split_.unseen) for m, acc in scores.methods.items()}
    groups = scores.group_results(split_.seen, split_.unseen)
    provenance = {
        "checkpoint": {"run": str(run), "step": info.get("step"), "head": info["head"].get("kind"), "train_shards": info.get("shards")},
        "test_shards": {"dir": str(test_dir), "manifest_sha256": hashlib.sha256((test_dir / MANIFEST_NAME).read_bytes()).hexdigest(), "images": total, "masks_meaningful": manifest.get("masks_meaningful")},
        "protocol": {"gt_min_score": gt_min_score, "threshold": threshold, "images_per_class": (manifest.get("config") or {}).get("images_per_class"), "objects": objects},
        "counts": {"images": scores.images, "filtered": scores.filtered, **({"group_images": scores.group_images} if groups else {})},
    }
    out = report_dir or (run / f"eval-{test_dir.name}")
    written = write_report(out, results, provenance, scores.examples, groups=groups)
    print_table(results, console=Console(), groups=groups)
    if not manifest.get("masks_meaningful", True):
        console.print("[yellow]note:[/] the teacher of these test shards has random weights: its masks are meaningless")
    click.echo(json.dumps({"report": str(written["json"]), "markdown": str(written["md"])}))


if __name__ == "__main__":
    main()
