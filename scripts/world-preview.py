#!/usr/bin/env python
"""What a trained world's generator draws: one image per caption as a PNG grid, and how many of
its samples the trained world teacher recognises.

    python scripts/world-preview.py --model world-sdxl --out docs/images/world-sdxl.png
    python scripts/world-preview.py --model world-sdxl --teacher world-maskrcnn --per-class 8

Captions name every class of the world (seen and unseen), alone and in pairs, with the
recipe's templates; images come from the pipeline's own sampler (``--steps``, ``--guidance``),
as ``iosd-gen --source diffusion`` runs it. With ``--teacher``, ``--per-class`` one-object
samples of every class are read by that teacher (evaluate/sample_reads.py) and the JSON on
stdout says how many it recognises, beside the same reading of the world's own rendered scenes
(the ceiling); the grid's titles then show what the teacher read.
"""

from __future__ import annotations

import json
import sys

import click

from iosd.errors import user_errors

READ_SCORE = 0.05  # the teacher keeps instances above this, as its mask AP is scored (evaluate/teacher_ap.py)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="world-sdxl", help="a trained world (iosd/worlds.py) or any diffusers directory")
@click.option("--out", default="docs/images/world-sdxl.png")
@click.option("--steps", type=int, default=25)
@click.option("--guidance", type=float, default=4.0)
@click.option("--seed", type=int, default=0)
@click.option("--pairs", type=int, default=4, help="two-object captions after the one-object ones")
@click.option("--teacher", default=None, help="a trained world teacher (world-maskrcnn) that reads the samples; needs mmdet")
@click.option("--per-class", type=click.IntRange(min=1), default=8, help="one-object samples per class that --teacher reads")
@user_errors(kept="nothing was written", rerun="then rerun the same command")
def main(model: str, out: str, steps: int, guidance: float, seed: int, pairs: int, teacher: str | None, per_class: int) -> None:
    import numpy as np
    import torch

    from iosd.classes import load_split
    from iosd.pipeline.models import load_model
    from iosd.viz import grid, save_png_atomic

    reader = None
    if teacher:
        from iosd.pipeline.teachers import TeacherOptions, build_teacher

        reader = build_teacher(TeacherOptions(name="mmdet", config=teacher, score_thr=READ_SCORE))  # first: a bad teacher is one line
    names = list(load_split("shapes", 1).all)
    if reader:
        reader.check_classes(names)  # a detector without the shape classes: one line before sampling
    loaded = load_model(model, device="cpu")
    side = loaded.info.get("world", {}).get("side", 64)
    repeats = per_class if reader else 1
    captions = [f"a photograph of a {n}" for n in names for _ in range(repeats)]
    prompted = [n for n in names for _ in range(repeats)]
    rng = np.random.default_rng(seed)
    captions += [f"a photograph of a {a} and a {b}" for a, b in (rng.choice(names, 2, replace=False) for _ in range(pairs))]

    def draw(chunk: list[int]) -> np.ndarray:
        gens = [torch.Generator().manual_seed(seed + i) for i in chunk]
        return loaded.pipe(prompt=[captions[i] for i in chunk], num_inference_steps=steps, guidance_scale=guidance, height=side, width=side, generator=gens, output_type="np").images

    index = list(range(len(captions)))
    images = np.concatenate([draw(index[i : i + 32]) for i in range(0, len(index), 32)])
    tiles = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    titles = [c.removeprefix("a photograph of a ") for c in captions]
    shown = list(range(0, len(prompted), repeats)) + list(range(len(prompted), len(captions)))
    if reader:
        from iosd.evaluate.sample_reads import rendered_one_object, summarise_reads, teacher_reads
        from iosd.evaluate.teacher_ap import predict_instances

        reads = teacher_reads(predict_instances(reader, tiles[: len(prompted)]), reader.names, prompted)
        rendered = rendered_one_object(names, per_class, seed, side, loaded.info.get("world", {}).get("style", "textured"))
        ceiling = summarise_reads(teacher_reads(predict_instances(reader, [im for im, _ in rendered]), reader.names, [n for _, n in rendered]))
        generated = summarise_reads(reads)
        for i, r in enumerate(reads):
            titles[i] = f"{r['prompted']}: {r['read'] or '-'} {r['top_score']:.2f}"
        print(json.dumps({"model": model, "teacher": teacher, "score_thr": READ_SCORE, "steps": steps, "guidance": guidance, "seed": seed, "generated": generated, "rendered": ceiling,
                          "recognised_vs_rendered": round(generated["recognised"] / max(ceiling["recognised"], 1e-9), 4)}, indent=2))
    path = save_png_atomic(grid([tiles[i] for i in shown], [titles[i] for i in shown], ncols=8, tile=96), out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
