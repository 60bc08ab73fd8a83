"""GD's Protocol II on the CPU world: does a dataset labelled by the head train a real segmenter?

1. ``iosd-gen``: shapes-world shards of the split's SEEN classes, features from ``--model``
   (the trained world ``world-sdxl`` by default; ``tiny`` is the random-weight SDXL).
2. ``iosd-train``: the grounding head on them (recipe ``fast``).
3. ``iosd-synth``: a semantic dataset of the UNSEEN classes, masks from that head (no teacher).
4. A standard MMSeg segmenter (``iosd.evaluate.segmenter``) trained on it, and the same
   segmenter trained on exact masks of as many images (the upper bound).
5. Both scored on exact-mask shapes images of the unseen classes that no diffusion model
   touched: ``protocol2.json``, ``protocol2.md`` (the table) and ``protocol2.png`` (overlays).

Every step resumes: rerunning the same command skips what is done. Exact-mask images are
painted as the model's world paints (a trained world: random hues, its style), so both rows
learn from and are scored on the same kind of image. With ``--model tiny`` the head's features
know nothing about unseen classes; the trained world is what shows the method in miniature, not
what the real SDXL-Turbo system would reach (docs/cpu-world.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from iosd.classes import load_split
from iosd.errors import UserError, user_errors
from iosd.evaluate.exact_set import semantic_class_list, write_exact_set
from iosd.evaluate.report import percent
from iosd.evaluate.segmenter import ARCHITECTURES, SegmenterConfig, score_segmenter, train_segmenter
from iosd.export_layout import DEFAULT_SPLIT
from iosd.manifest import write_json_atomic, write_text_atomic
from iosd.pipeline.export import read_semantic_sample, semantic_keys
from iosd.viz import grid, overlay, save_png_atomic
from iosd.worlds import WORLDS, verify_world

TEST_SPLIT = "val"  # MMSeg's name for the split a model is scored on
EXAMPLES = 6
console = Console(stderr=True, highlight=False)


def tool(name: str) -> str:
    """The path of an iosd command installed next to this Python, or on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise UserError(f"{name} is not installed here", "pip install -e . in this environment (make install)")
    return found


def require_synth() -> str:
    """``iosd-synth`` (issue 9) labels the unseen classes; without it there is no Protocol II."""
    try:
        return tool("iosd-synth")
    except UserError:
        raise UserError("iosd-synth is not installed: Protocol II needs it to label the unseen classes", "finish pipeline/synth_cli.py (issue 9), pip install -e ., then rerun") from None


def run_step(title: str, args: list[str]) -> None:
    """One iosd command, its output shown; a failure ends the script with its exit status."""
    console.print(f"[bold]== {title}[/]\n$ {' '.join(args)}")
    done = subprocess.run(args, check=False)
    if done.returncode != 0:
        raise UserError(f"{title} failed (exit status {done.returncode})", "see its message above; rerun to resume")


def label_count(root: Path, split: str = DEFAULT_SPLIT) -> int:
    return len(semantic_keys(root, split))


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)


def world_look(model: str) -> tuple[str, str]:
    """(palette, style) of the scenes ``model``'s head learns from: a trained world's record
    (checked against its files), or the tiny models' hue per class on textured scenes."""
    if model in WORLDS:
        record = verify_world(model)
        return record["palette"], record.get("style", "textured")
    return "class", "textured"


def exact_set(root: Path, classes: list[str], images: int, *, size: int, objects: int, seed: int, split: str, title: str, look: tuple[str, str]) -> None:
    """Exact-mask shapes images, ``images`` in all (classes cycled), resumable."""
    per_class = -(-images // len(classes))
    if label_count(root, split) > per_class * len(classes):
        raise UserError(f"{root} holds more images than this run asks for", "remove it or pass the settings it was made with")
    with progress_bar() as bar:
        task = bar.add_task(title, total=per_class * len(classes), note="")
        write_exact_set(root, classes, per_class, size=size, objects=objects, seed=seed, split=split, palette=look[0], style=look[1], progress=lambda done, total: bar.update(task, completed=done))


def train(root: Path, config: SegmenterConfig, title: str):
    with progress_bar() as bar:
        task = bar.add_task(title, total=config.steps, note="")
        return train_segmenter(root, config, progress=lambda step, total, loss: bar.update(task, completed=step, note=f"loss {loss:.3f}"))


def label_masks(label: np.ndarray, label_classes: list[str], names: list[str]) -> np.ndarray:
    """(len(names), H, W) masks of the classes ``names`` from a label map whose ids index
    ``label_classes`` (each segmenter predicts in its training set's order)."""
    return np.stack([label == label_classes.index(name) for name in names])


def overlays_picture(rows: dict[str, dict], classes: list[str], path: Path) -> None:
    """One row per test image: the image, its exact mask, then each segmenter's prediction."""
    names = list(rows)
    tiles, titles = [], []
    foreground = classes[1:]
    for i in range(len(rows[names[0]]["examples"])):
        image_path, _, truth = rows[names[0]]["examples"][i]
        image = np.asarray(Image.open(image_path).convert("RGB"))
        tiles += [image, overlay(image, label_masks(truth, rows[names[0]]["classes"], foreground), foreground)]
        titles += [Path(image_path).stem, "exact mask"]
        for name in names:
            tiles.append(overlay(image, label_masks(rows[name]["examples"][i][1], rows[name]["classes"], foreground)))
            titles.append(f"trained on {name}")
    save_png_atomic(grid(tiles, titles, ncols=2 + len(names), tile=160), path)


def markdown(report: dict) -> str:
    classes = report["unseen_classes"]
    lines = [
        "# GD's Protocol II on the CPU world",
        "",
        f"A {report['segmenter']['architecture']} segmenter (MMSegmentation, trained from scratch) scored on "
        f"{report['test_images']} exact-mask shapes images ({report['objects_per_image']} object(s) each) of the unseen classes of shapes split {report['split']} "
        "that no diffusion model touched. IoU in %.",
        "",
        "| trained on | images | " + " | ".join(classes) + " | mIoU | background |",
        "|---|---:|" + "---:|" * len(classes) + "---:|---:|",
    ]
    for name, row in report["rows"].items():
        per_class = row["per_class_iou"]
        cells = [percent(per_class.get(c)) for c in classes]
        lines.append(f"| {name} | {row['train_images']} | " + " | ".join(cells) + f" | {percent(row['miou'])} | {percent(per_class.get('background'))} |")
    ratio = report.get("synth_over_exact")
    lines += ["", f"Synth / exact mIoU: {ratio:.2f}." if ratio is not None else "", "", f"Command: `{report['command']}`", ""]
    lines += [
        f"The head saw only the seen classes; its features come from `{report['model']}` on shapes-world images. "
        + ("With one object per image a synth mask's class is the prompt's and its extent the head's (`--objects 2` makes the head tell unseen classes apart)." if report["objects_per_image"] == 1 else "With two unseen objects per image the head must tell unseen classes apart."),
        "This is the CPU world: it shows the machinery end to end, not what the real SDXL-Turbo",
        "system reaches on real images.",
        "",
    ]
    return "\n".join(lines)


@click.command(context_settings={"show_default": True})
@click.option("--out", default="runs/protocol2", help="working and report directory (reruns resume in it)")
@click.option("--model", default="world-sdxl", help="the generator whose features the head learns from: a trained world, or tiny (random weights)")
@click.option("--split", default=1, help="shapes class split: its seen classes train the head, its unseen ones are synthesised")
@click.option("--train-samples", default=300, help="seen-class shard samples for the head")
@click.option("--head-steps", default=300, help="iosd-train steps")
@click.option("--images-per-class", default=30, help="synthesised (and exact upper-bound) training images per unseen class")
@click.option("--test-images-per-class", default=20, help="exact-mask test images per unseen class")
@click.option("--objects", type=click.IntRange(1, 2), default=1, help="objects per image, synthesised and exact alike (2: each class with another unseen one)")
@click.option("--architecture", type=click.Choice(ARCHITECTURES), default="segformer", help="the MMSeg segmenter")
@click.option("--seg-steps", default=150, help="segmenter training steps")
@click.option("--seed", default=0)
@click.option("--synth-arg", "synth_args", multiple=True, help="extra argument passed to iosd-synth (repeatable)")
@user_errors
def main(out: str, model: str, split: int, train_samples: int, head_steps: int, images_per_class: int, test_images_per_class: int, objects: int, architecture: str, seg_steps: int, seed: int, synth_args: tuple[str, ...]) -> None:
    """Train a head on seen shapes, synthesise the unseen ones, train and score a segmenter."""
    started = time.perf_counter()
    synth = require_synth()
    look = world_look(model)
    root = Path(out)
    classes = load_split("shapes", split)
    unseen = list(classes.unseen)
    shards, head, synth_dir = root / "shards-seen", root / "head", root / f"synth-{objects}obj"
    run_step(f"1/5 seen-class shards (shapes world, {model})", [tool("iosd-gen"), "--recipe", "fast", "--classes", "shapes", "--source", "shapes", "--model", model, "--split", str(split), "--num-samples", str(train_samples), "--shard-size", "100", "--batch-size", "16", "--seed", str(seed), "--out", str(shards)])
    resume = ["--resume"] if (head / "checkpoint.json").exists() else []
    run_step("2/5 grounding head on the seen classes", [tool("iosd-train"), str(shards), "--steps", str(head_steps), "--out", str(head), "--no-tensorboard", *resume])
    run_step("3/5 iosd-synth: semantic dataset of the unseen classes, labelled by the head", [synth, "--checkpoint", str(head), "--classes", ",".join(unseen), "--images-per-class", str(images_per_class), "--objects", str(objects), "--format", "semantic", "--seed", str(seed), "--out", str(synth_dir), *synth_args])
    synth_images = label_count(synth_dir)
    if synth_images == 0:
        raise UserError(f"iosd-synth kept no images in {synth_dir}", "loosen its filters (--synth-arg --min-confidence=0)")
    if sorted(semantic_class_list(synth_dir)[1:]) != sorted(unseen):
        raise UserError(f"{synth_dir} holds other classes than {', '.join(unseen)}", "remove it and rerun")

    console.print("[bold]== 4/5 exact-mask sets: the upper bound's training images and the test images")
    size = read_semantic_sample(synth_dir, DEFAULT_SPLIT, semantic_keys(synth_dir)[0])[1].shape[0]
    exact_train, exact_test = root / f"exact-train-{objects}obj", root / f"exact-test-{objects}obj"
    exact_set(exact_train, unseen, synth_images, size=size, objects=objects, seed=seed, split=DEFAULT_SPLIT, title="exact training images", look=look)
    exact_set(exact_test, unseen, test_images_per_class * len(unseen), size=size, objects=objects, seed=seed, split=TEST_SPLIT, title="exact test images", look=look)

    console.print(f"[bold]== 5/5 {architecture} segmenter: trained on each set, scored on the exact test images")
    config = SegmenterConfig(architecture=architecture, steps=seg_steps, seed=seed)
    rows = {}
    for name, data in (("iosd-synth", synth_dir), ("exact masks", exact_train)):
        trained = train(data, config, f"train on {name}")
        scores = score_segmenter(trained, exact_test, split=TEST_SPLIT, keep=EXAMPLES)
        rows[name] = {**scores, "classes": trained.classes, "train_images": label_count(data), "train_dir": str(data), "final_loss": trained.final_loss}
    test_classes = semantic_class_list(exact_test)
    overlays_picture(rows, test_classes, root / "protocol2.png")
    synth_miou, exact_miou = rows["iosd-synth"]["miou"], rows["exact masks"]["miou"]
    report = {
        "model": model,
        "palette": look[0],
        "style": look[1],
        "split": split,
        "seen_classes": list(classes.seen),
        "unseen_classes": unseen,
        "test_images": rows["exact masks"]["images"],
        "objects_per_image": objects,
        "test_dir": str(exact_test),
        "segmenter": config.to_json(),
        "rows": {name: {k: v for k, v in row.items() if k != "examples"} for name, row in rows.items()},
        "synth_over_exact": synth_miou / exact_miou if synth_miou is not None and exact_miou else None,
        "command": " ".join(sys.argv),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(root / "protocol2.json", report)
    write_text_atomic(root / "protocol2.md", markdown(report))
    print(markdown(report))
    print(json.dumps({"synth_miou": synth_miou, "exact_miou": exact_miou, "report": str(root / "protocol2.md")}))


if __name__ == "__main__":
    main()
