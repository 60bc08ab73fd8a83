"""``iosd-predict``: generate (or take) an image and segment any class you name (GD's Figure 1)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np

from iosd.errors import UserError, user_errors
from iosd.prechecks import check_class_names, check_writable
from iosd.verbosity import verbose_option


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from iosd.pipeline.real_images import square_box

    try:
        img = Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"--image {path} is not a readable image ({err})", "pass a PNG or JPEG file") from None
    return np.asarray(img.crop(square_box(*img.size)).resize((size, size), Image.BICUBIC))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("prompt", required=False)
@click.option("--checkpoint", default=None, help="run directory of iosd-train [default: the most recent run under runs/]")
@click.option("--classes", "class_list", required=True, help='comma-separated class names to segment, e.g. "unicorn,lion dance"')
@click.option("--image", "image_path", default=None, type=click.Path(path_type=Path), help="segment this image (re-noised UNet pass) instead of generating one")
@click.option("--out", default="predictions", type=click.Path(path_type=Path), help="output directory")
@click.option("--seed", type=int, default=0)
@click.option("--threshold", type=float, default=0.5, help="sigmoid threshold")
@click.option("--device", default="auto")
@click.option("--runs", "runs_root", default="runs")
@verbose_option
@user_errors
def main(prompt, checkpoint, class_list, image_path, out, seed, threshold, device, runs_root) -> None:
    """Generate an image for PROMPT with the checkpoint's model and write one mask per class."""
    from rich.console import Console

    from iosd.evaluate.cli import _resolve_run
    from iosd.evaluate.predict import predict

    names = [n.strip() for n in class_list.split(",")]
    if any(not n for n in names):
        raise UserError(f"--classes {class_list!r} has an empty class name", 'pass names separated by commas, e.g. "cat,dog"')
    check_class_names(names)
    check_writable(out)
    if image_path is not None and not Path(image_path).is_file():
        raise UserError(f"--image {image_path} does not exist", "pass a PNG or JPEG file")
    if prompt is None and image_path is None:
        raise UserError("nothing to segment: no PROMPT and no --image", 'give a prompt, e.g. "a photograph of a cat", or --image FILE')
    if not 0 < threshold < 1:
        raise UserError(f"--threshold {threshold} is outside (0, 1)", "pass e.g. 0.5")
    console = Console(stderr=True)
    if prompt is not None:
        for name in names:
            if not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", prompt, re.IGNORECASE):
                console.print(f"[yellow]note:[/] class {name!r} is not in the prompt; segmenting it anyway")
    run = _resolve_run(checkpoint, runs_root)
    result = predict(run, prompt, names, out=out, image=image_path, seed=seed, threshold=threshold, device=device, load_image=_load_image)
    click.echo(json.dumps(result))


if __name__ == "__main__":
    main()
