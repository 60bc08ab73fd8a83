"""``iosd-synth``: a labelled dataset for any class names, from a trained head (GD's Protocol II)."""

from __future__ import annotations

import json

import click

from iosd.choices import TEACHER_NAMES
from iosd.errors import user_errors
from iosd.export_layout import FORMATS
from iosd.pipeline.prompts import OBJECTS
from iosd.pipeline.tasks import AUTO, TASK_HELP
from iosd.verbosity import verbose_option


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--checkpoint", required=True, help="run directory of iosd-train")
@click.option("--classes", "class_list", required=True, help='comma-separated class names ("unicorn,lion dance") or a file with one name per line')
@click.option("--images-per-class", type=int, required=True, help="images generated per class (before quality control)")
@click.option("--objects", type=click.Choice(OBJECTS), default="1", help="objects per prompt: 1, 2 (each class with a random partner) or mix (half and half, GD)")
@click.option("--format", "fmt", default="coco", help=f"export format: {', '.join(FORMATS)}")
@click.option("--out", required=True, help="output directory or object-store URL (s3://bucket/out; a rerun of the same command resumes it)")
@click.option("--min-confidence", type=float, default=0.0, help="drop a mask whose mean probability inside it is lower")
@click.option("--min-agreement", type=float, default=None, help="drop a mask whose IoU with the teacher's is lower (classes the teacher knows; with diffusion this runs the checkpoint's teacher, or --teacher's)")
@click.option("--teacher", type=click.Choice(TEACHER_NAMES), default=None, help="with --min-agreement: the teacher to agree with; a text-prompted one knows every class [default: the checkpoint's shards' teacher]")
@click.option("--min-area", type=float, default=0.0, help="drop a mask covering less of the image than this fraction")
@click.option("--max-area", type=float, default=1.0, help="drop a mask covering more of the image than this fraction")
@click.option("--threshold", type=float, default=0.5, help="sigmoid threshold of the head's masks")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option("--batch", type=int, default=4, help="images per diffusion and head batch")
@click.option("--chunk-size", type=int, default=16, help="images per chunk, the unit of resuming and of work per rank")
@click.option("--task", default=AUTO, metavar="I/N", help=TASK_HELP.replace("items", "chunks") + " (docs/scale-out.md)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@verbose_option
@user_errors
def main(checkpoint, class_list, images_per_class, objects, fmt, out, min_confidence, min_agreement, teacher, min_area, max_area, threshold, seed, device, batch, chunk_size, quiet, task) -> None:
    """Generate images of the named classes with the checkpoint's model, segment them with its
    head (no teacher), keep the masks that pass quality control, and export them.

    Formats: coco (instances JSON, RLE masks), semantic (MMSegmentation img_dir/ann_dir +
    classes.json), shards (iosd shards iosd-train reads). Every export has preview.png and
    synth.json (settings, every decision, counts). Runs under torchrun like iosd-gen.
    """
    from iosd.pipeline.synth import SynthConfig, read_class_names, synthesize

    cfg = SynthConfig(
        checkpoint=checkpoint, classes=read_class_names(class_list), images_per_class=images_per_class, out=out, objects=objects, format=fmt,
        min_confidence=min_confidence, min_agreement=min_agreement, min_area=min_area, max_area=max_area, threshold=threshold, seed=seed,
        batch=batch, chunk_size=chunk_size, device=device, quiet=quiet, task=task, teacher=teacher,
    )
    report = synthesize(cfg)
    if report:
        summary = report["summary"]
        click.echo(json.dumps({"out": out, "format": fmt, "images": summary["images"], "images_kept": summary["images_kept"], "masks": summary["masks"], "files": report["files"]}))


if __name__ == "__main__":
    main()
