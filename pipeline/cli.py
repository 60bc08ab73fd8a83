"""``iosd-gen``: build prompts, run the diffusion model, cache features, label with the teacher, write shards."""

from __future__ import annotations

import json

import click

from iosd.choices import (
    CODEC_NAMES,
    DEFAULT_CALIBRATION,
    DEFAULT_CODEC,
    GT_RULES,
    HIDDEN_STATES,
    POOLINGS,
    TEACHER_NAMES,
)
from iosd.errors import user_errors
from iosd.layers import FEATURE_DTYPES, PRESETS
from iosd.pipeline.tasks import AUTO, TASK_HELP
from iosd.recipes import HALVES, SCHEDULERS, recipe_names
from iosd.recipes import show_config as show_resolved
from iosd.verbosity import verbose_option

RECIPES = ", ".join(recipe_names())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--recipe", default=None, help=f"one of {RECIPES}: published configuration the other options default to [default: iosd; fast for --model tiny]")
@click.option("--show-config", is_flag=True, help="print the resolved settings and where each comes from, then exit")
@click.option("--classes", default="coco", help="class set: pascal, coco, shapes, or a JSON file with seen/unseen lists")
@click.option("--split", type=int, default=1, help="class split 1..3")
@click.option("--subset", type=click.Choice(["seen", "unseen", "all"]), default="seen", help="which classes prompts draw from, or which annotated classes your own images' samples take (training uses seen)")
@click.option("--source", default="diffusion", help="diffusion: generated images + teacher; shapes: built-in world with exact masks; coco:ANNOTATIONS.json[:IMAGES_DIR] or folder:DIR: your own labelled images (docs/your-own-images.md)")
@click.option("--model", default=None, help="hub id, local diffusers directory (SDXL or SD 1.x/2.x), 'tiny' or 'tiny-sd1' (embedded random-weight stand-ins), 'world-sdxl' or 'world-sd1' (the trained CPU world, docs/cpu-world.md) [recipe]")
@click.option("--revision", default=None, help="hub revision (commit, branch or tag)")
@click.option("--num-samples", type=int, default=None, help="samples written, after filtering [default: 1000; every usable image of coco:/folder: sources]")
@click.option("--shard-size", type=int, default=100, help="samples per shard")
@click.option("--seed", type=int, default=0)
@click.option("--out", default=None, help="output directory or object-store URL (s3://bucket/set, docs/scale-out.md) [default: shards/<classes><split>; shards/<file or folder name>-<classes><split> for coco:/folder: sources]")
@click.option("--objects", type=click.Choice(["1", "2", "mix"]), default=None, help="objects per prompt [recipe]")
@click.option("--template", default=None, help="one-object prompt template [recipe]")
@click.option("--template2", default=None, help="two-object and negative-class prompt template [recipe]")
@click.option("--negative", is_flag=True, help="IOSD's negative-class prompt (DSFP): the query and a random other class; only the query is supervised")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default=None, help="the pipeline's own scheduler, or DDIM [recipe]")
@click.option("--steps", type=int, default=None, help="denoising steps [recipe]")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale [recipe]")
@click.option("--resolution", type=int, default=None, help="image side in pixels [recipe; 128 for the tiny models]")
@click.option("--batch-size", type=int, default=4)
@click.option("--layers", default=None, help=f"feature preset ({', '.join(PRESETS)}) or comma-separated UNet module paths [recipe]")
@click.option("--halves", type=click.Choice(HALVES), default=None, help="under guidance, capture the conditional half or both halves side by side (GD) [recipe]")
@click.option("--feature-dtype", type=click.Choice(FEATURE_DTYPES), default=None, help="[recipe]")
@click.option("--codec", type=click.Choice(CODEC_NAMES), default=DEFAULT_CODEC, help="feature compression")
@click.option("--project", type=int, default=None, help="store K channels per resolution group: a PCA basis fitted on the first --calibration-samples candidates (saved as projection.safetensors) [default: every layer as captured]")
@click.option("--calibration-samples", type=int, default=None, help=f"with --project: candidates the basis is fitted on  [default: {DEFAULT_CALIBRATION}]")
@click.option("--feature-t", type=int, default=None, help="capture in an extra UNet pass on the final latent re-noised to this timestep [default: the denoising step; 50 for image sources]")
@click.option("--feature-step", type=int, default=None, help="denoising call to capture, negative counts from the end [recipe]")
@click.option("--query-template", default=None, help="text whose class-name tokens give the query embedding [recipe]")
@click.option("--query-pooling", type=click.Choice(POOLINGS), default=None, help="the name's tokens averaged, or its first token [recipe]")
@click.option("--query-hidden", type=click.Choice(HIDDEN_STATES), default=None, help="text-encoder layer of the query [recipe]")
@click.option("--gt", type=click.Choice(GT_RULES), default=None, help="a class's mask: the top teacher instance, or the union of its instances [recipe]")
@click.option("--teacher", type=click.Choice(TEACHER_NAMES), default=None, help="who labels the images: mmdet's Mask R-CNN (the papers'; COCO classes; needs mmcv) or a text-prompted teacher that labels any class name (transformers only) [default: mmdet]")
@click.option("--teacher-model", default=None, help="text-prompted teachers: hub ids or local directories of their models, comma-separated (detector,segmenter) [default: iosd/data/teachers.json]")
@click.option("--teacher-config", default=None, help="mmdet config name or path, or world-maskrcnn (the trained CPU-world teacher) [default: Mask R-CNN Swin-S 3x COCO]")
@click.option("--teacher-checkpoint", default=None, help="mmdet teacher checkpoint path or URL")
@click.option("--labels", type=click.Choice(["exact", "teacher"]), default=None, help="image sources: their exact masks, or the teacher's, as generated images get them (a real detector's mistakes and the --min-score filter, on images no generator has to draw) [default: exact]")
@click.option("--min-score", type=float, default=None, help="drop a class whose teacher score is lower [recipe; 0 for exact masks and the tiny teacher]")
@click.option("--score-thr", type=float, default=None, help="teacher detection score threshold [recipe, or the text-prompted teacher's; 0 for the tiny teacher]")
@click.option("--mask-thr", type=float, default=None, help="teacher mask binarisation threshold [recipe, or the text-prompted teacher's]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N")
@click.option("--workers", type=int, default=2, help="threads that encode and compress samples")
@click.option("--overwrite", is_flag=True, help="replace a shard set generated with a different config")
@click.option("--task", default=AUTO, metavar="I/N", help=TASK_HELP + " (docs/scale-out.md)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@verbose_option
@user_errors
def main(show_config: bool, **options) -> None:
    """Generate training shards: prompts -> diffusion -> cached UNet features -> Mask R-CNN masks.

    Options marked [recipe] default to the recipe's value (--show-config lists them).
    """
    from iosd.pipeline.generate import GenConfig, generate

    cfg = GenConfig(**options)
    if show_config:
        filled, resolved = cfg.with_recipe()
        filled.resolved()  # the same checks a run makes
        show_resolved(resolved)
        return
    manifest, times = generate(cfg)
    if manifest:
        counts = manifest.get("counts", {})
        summary = {"out": manifest["config"]["out"], "recipe": manifest["recipe"]["name"], "shards": len(manifest["shards"]), "written": counts.get("written", 0), "candidates": counts.get("candidates", 0), "dropped_samples": counts.get("dropped_samples", 0), "complete": manifest["complete"], "seconds": {k: round(v, 2) for k, v in times.seconds.items()}}
        click.echo(json.dumps(summary))


if __name__ == "__main__":
    main()
