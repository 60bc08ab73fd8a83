"""Bytes per sample of each feature preset and each recipe at 512 px, on the real UNet layouts.

The UNets (SDXL-Turbo's, SD 1.x's) are built on the meta device from their configs, so this
needs no weights and no GPU. Prints one JSON object per preset and per recipe; a recipe's line
adds its head's parameters and GFLOP of one forward and backward pass per sample (2 classes),
counted on the meta device.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from iosd.layers import PRESETS
from iosd.pipeline.capture import preset_shapes, recipe_shapes
from iosd.pipeline.families import get_family
from iosd.recipes import get_recipe, recipe_names
from iosd.train.heads import build_head, head_gflops


def megabytes(shapes: dict[str, list[int]], itemsize: int = 2) -> float:
    return round(sum(int(np.prod(s)) * itemsize for s in shapes.values()) / 1e6, 2)


def main() -> None:
    for preset, p in PRESETS.items():
        shapes = preset_shapes(preset)
        print(json.dumps({"preset": preset, "family": p.family, "maps": len(shapes), "float16_mb": megabytes(shapes), "int8_mb": megabytes(shapes, 1), "layers": {k: f"{s[0]}@{s[1]}" for k, s in shapes.items()}}))
    for recipe in recipe_names():
        shapes = recipe_shapes(recipe)
        r = get_recipe(recipe)
        kind = r.value("train", "head")
        layout = {"layers": [[path, shape] for path, shape in shapes.items()], "embedding_dim": get_family(r.family).unet_config()["cross_attention_dim"]}
        with torch.device("meta"):
            params = sum(p.numel() for p in build_head(kind, layout).parameters())
        print(json.dumps({"recipe": recipe, "maps": len(shapes), "float16_mb": megabytes(shapes), "int8_mb": megabytes(shapes, 1),
                          "head": kind, "head_params": params, "head_gflop_fwd_bwd_2_queries": round(head_gflops(kind, layout), 1)}))


if __name__ == "__main__":
    main()
