"""``iosd-gen``: build prompts, run SDXL-Turbo, cache features, label with the teacher, write shards."""

from __future__ import annotations

import json

import click

from iosd.errors import user_errors
from iosd.featstore import CODECS, DEFAULT_CODEC
from iosd.layers import DEFAULT_PRESET, FEATURE_DTYPES
from iosd.pipeline.models import DEFAULT_MODEL
from iosd.pipeline.prompts import GD_TEMPLATE, GD_TEMPLATE_2


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--classes", default="coco", help="class set: pascal, coco, shapes, or a JSON file with seen/unseen lists")
@click.option("--split", type=int, default=1, help="class split 1..3")
@click.option("--subset", type=click.Choice(["seen", "unseen", "all"]), default="seen", help="which classes prompts draw from (training uses seen)")
@click.option("--source", type=click.Choice(["diffusion", "shapes"]), default="diffusion", help="diffusion: SDXL images + teacher; shapes: built-in world with exact masks")
@click.option("--model", default=DEFAULT_MODEL, help="hub id, local diffusers directory, or 'tiny' (embedded random-weight SDXL)")
@click.option("--revision", default=None, help="hub revision (commit, branch or tag)")
@click.option("--num-samples", type=int, default=1000, help="samples written, after filtering")
@click.option("--shard-size", type=int, default=100, help="samples per shard")
@click.option("--seed", type=int, default=0)
@click.option("--out", default=None, help="output directory [default: shards/<classes><split>]")
@click.option("--objects", type=click.Choice(["1", "2", "mix"]), default="1", help="objects per prompt")
@click.option("--template", default=GD_TEMPLATE, help="one-object prompt template")
@click.option("--template2", default=GD_TEMPLATE_2, help="two-object prompt template (--objects 2 or mix)")
@click.option("--negative", is_flag=True, help="IOSD's negative-class prompt: the query and a random other class")
@click.option("--steps", type=int, default=1, help="denoising steps (SDXL-Turbo: 1-4)")
@click.option("--resolution", type=int, default=None, help="image side in pixels [default: 512; 128 for --model tiny]")
@click.option("--batch-size", type=int, default=4)
@click.option("--layers", default=DEFAULT_PRESET, help="feature preset (compact, iosd, gd) or comma-separated UNet module paths")
@click.option("--feature-dtype", type=click.Choice(FEATURE_DTYPES), default="float16")
@click.option("--codec", type=click.Choice(list(CODECS)), default=DEFAULT_CODEC, help="feature compression")
@click.option("--feature-t", type=int, default=None, help="capture in an extra UNet pass on the final latent re-noised to this timestep [default: the last denoising step; 50 for image sources]")
@click.option("--feature-step", type=int, default=-1, help="denoising call to capture (negative counts from the end)")
@click.option("--teacher-config", default=None, help="mmdet config name or path [default: Mask R-CNN Swin-S 3x COCO]")
@click.option("--teacher-checkpoint", default=None, help="teacher checkpoint path or URL")
@click.option("--min-score", type=float, default=None, help="drop a class whose best teacher score is lower [default: 0.8; 0 for the tiny teacher]")
@click.option("--score-thr", type=float, default=None, help="teacher detection score threshold [default: 0.05 (GD); 0 for the tiny teacher]")
@click.option("--mask-thr", type=float, default=0.5, help="teacher mask binarisation threshold")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option("--workers", type=int, default=2, help="threads that encode and compress samples")
@click.option("--overwrite", is_flag=True, help="replace a shard set generated with a different config")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def main(**options) -> None:
    """Generate training shards: prompts -> SDXL-Turbo -> cached UNet features -> Mask R-CNN masks."""
    from iosd.pipeline.generate import GenConfig, generate

    manifest, times = generate(GenConfig(**options))
    if manifest:
        counts = manifest.get("counts", {})
        summary = {"out": manifest["config"]["out"], "shards": len(manifest["shards"]), "written": counts.get("written", 0), "candidates": counts.get("candidates", 0), "dropped_samples": counts.get("dropped_samples", 0), "complete": manifest["complete"], "seconds": {k: round(v, 2) for k, v in times.seconds.items()}}
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
