"""`--project K` at a recipe's real layout (512 px, random values, no weights): what it costs.

Prints one JSON line: raw and projected float16 bytes per sample and their ratio, calibration
seconds per sample (float64 covariance sums), the one-off `eigh` seconds, and seconds to project
one sample. Random features say nothing of how much a projection keeps (bench/storage.py does,
on the CPU world); this measures bytes and compute at the real channel counts.
"""

from __future__ import annotations

import json
import math
import time

import click
import torch

from iosd.pipeline.capture import recipe_shapes
from iosd.projection import CovarianceFit


@click.command()
@click.option("--recipe", default="iosd", show_default=True, help="layout: iosd (19 SDXL maps) or gd (25 SD v1 maps)")
@click.option("--k", default=32, show_default=True)
@click.option("--samples", default=2, show_default=True, help="calibration samples to time")
def main(recipe: str, k: int, samples: int) -> None:
    torch.manual_seed(0)
    shapes = recipe_shapes(recipe)
    fit = CovarianceFit([[p, s] for p, s in shapes.items()])
    started = time.perf_counter()
    for _ in range(samples):
        fit.add({p: torch.randn(1, *s, dtype=torch.float16) for p, s in shapes.items()})
    per_sample = (time.perf_counter() - started) / samples
    started = time.perf_counter()
    projection = fit.fit(k)
    eigh = time.perf_counter() - started
    features = {p: torch.randn(1, *s) for p, s in shapes.items()}
    started = time.perf_counter()
    projection.apply(features)
    apply = time.perf_counter() - started
    raw = sum(math.prod(s) * 2 for s in shapes.values())
    stored = sum(math.prod(s) * 2 for _, s in projection.stored_layers())
    print(json.dumps({"case": f"{recipe}-project{k}", "raw_fp16_bytes": raw, "bytes_per_sample": stored, "ratio": round(raw / stored, 1),
                      "calibration_s_per_sample": round(per_sample, 2), "fit_eigh_s": round(eigh, 1), "apply_s_per_sample": round(apply, 2)}))


if __name__ == "__main__":
    main()
