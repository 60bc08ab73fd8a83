#!/usr/bin/env python
"""Can a trained world's text conditioning tell its class names apart? A head cannot do better.

Prints, as JSON, the centred cosine between every pair of class names where a head reads them
(the query embeddings) and where the UNet reads them (its cross-attention keys), and the share
of the names' variance the top directions hold (train/name_geometry.py); draws the query
matrix as a PNG.

    python scripts/world-queries.py --model world-sdxl --png docs/images/world-queries.png
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from iosd.errors import UserError, user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="world-sdxl", help="a trained world (iosd/worlds.py)")
@click.option("--template", default="a photograph of a {}", help="the query template (the fast recipe's)")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="write the query cosine matrix here")
@user_errors(kept="nothing was written", rerun="then rerun the same command")
def main(model: str, template: str, png: Path | None) -> None:
    from iosd.pipeline.models import load_model
    from iosd.train.name_geometry import name_geometry
    from iosd.worlds import WORLDS, verify_world

    if model not in WORLDS:
        raise UserError(f"{model!r} is not a trained world", f"use one of {', '.join(WORLDS)}")
    names = verify_world(model)["classes"]
    geometry = name_geometry(load_model(model, device="cpu").pipe, names, template)
    print(json.dumps({"model": model, **geometry}))
    if png:
        draw(geometry, f"{model}: class queries, centred cosine", png)


def draw(geometry: dict, title: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from iosd.viz import save_png_atomic

    names = geometry["classes"]
    fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=110)
    im = ax.imshow(geometry["query_cos"], vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.canvas.draw()
    save_png_atomic(Image.frombuffer("RGBA", fig.canvas.get_width_height(), fig.canvas.buffer_rgba()).convert("RGB"), png)
    plt.close(fig)


if __name__ == "__main__":
    main()
