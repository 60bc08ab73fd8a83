#!/usr/bin/env python
"""What a trained world's generator draws: one image per caption, as a PNG grid.

    python scripts/world-preview.py --model world-sdxl --out docs/images/world-sdxl.png

Captions name every class of the world (seen and unseen), alone and in pairs, with the
recipe's templates; images come from the pipeline's own sampler (``--steps``, ``--guidance``),
as ``iosd-gen --source diffusion`` runs it.
"""

from __future__ import annotations

import sys

import click

from iosd.errors import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="world-sdxl", help="a trained world (iosd/worlds.py) or any diffusers directory")
@click.option("--out", default="docs/images/world-sdxl.png")
@click.option("--steps", type=int, default=25)
@click.option("--guidance", type=float, default=4.0)
@click.option("--seed", type=int, default=0)
@click.option("--pairs", type=int, default=4, help="two-object captions after the one-object ones")
@user_errors
def main(model: str, out: str, steps: int, guidance: float, seed: int, pairs: int) -> None:
    import numpy as np
    import torch

    from iosd.classes import load_split
    from iosd.pipeline.models import load_model
    from iosd.viz import grid, save_png_atomic

    loaded = load_model(model, device="cpu")
    side = loaded.info.get("world", {}).get("side", 64)
    names = list(load_split("shapes", 1).all)
    captions = [f"a photograph of a {n}" for n in names]
    rng = np.random.default_rng(seed)
    captions += [f"a photograph of a {a} and a {b}" for a, b in (rng.choice(names, 2, replace=False) for _ in range(pairs))]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    images = loaded.pipe(prompt=captions, num_inference_steps=steps, guidance_scale=guidance, height=side, width=side, generator=gens, output_type="np").images
    tiles = [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]
    titles = [c.removeprefix("a photograph of a ") for c in captions]
    path = save_png_atomic(grid(tiles, titles, ncols=8, tile=96), out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
