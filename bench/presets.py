"""Bytes per sample of each feature preset at 512 px on SDXL(-Turbo)'s UNet layout.

The UNet is built on the meta device from SDXL's config, so this needs no weights and no GPU.
"""

from __future__ import annotations

import numpy as np

from iosd.layers import PRESETS
from iosd.pipeline.capture import sdxl_layer_shapes


def preset_shapes(resolution: int = 512) -> dict[str, dict[str, list[int]]]:
    return {preset: sdxl_layer_shapes(paths, resolution) for preset, paths in PRESETS.items()}


def main() -> None:
    for preset, shapes in preset_shapes().items():
        fp16 = sum(int(np.prod(s)) * 2 for s in shapes.values())
        layers = ", ".join(f"{p} {s[0]}@{s[1]}" for p, s in shapes.items())
        print(f"{preset:8s} float16 {fp16 / 1e6:6.2f} MB  int8 {fp16 / 2e6:6.2f} MB  | {layers}")


if __name__ == "__main__":
    main()
