"""Bytes per sample of each feature preset at 512 px on SDXL(-Turbo)'s UNet layout.

The UNet is built on the meta device from SDXL's config, so this needs no weights and no GPU.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from iosd.layers import PRESETS
from iosd.pipeline.capture import FeatureCapture
from iosd.pipeline.tiny import SDXL_UNET_CONFIG


def preset_shapes(resolution: int = 512) -> dict[str, dict[str, list[int]]]:
    side = resolution // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    out = {}
    for preset, paths in PRESETS.items():
        with FeatureCapture(unet, paths) as cap, torch.device("meta"):
            cap.armed = True
            unet(torch.zeros(1, 4, side, side), torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 77, 2048), added_cond_kwargs={"text_embeds": torch.zeros(1, 1280), "time_ids": torch.zeros(1, 6)})
            out[preset] = {p: list(t.shape[1:]) for p, t in cap.take().items()}
    return out


def main() -> None:
    for preset, shapes in preset_shapes().items():
        fp16 = sum(int(np.prod(s)) * 2 for s in shapes.values())
        layers = ", ".join(f"{p} {s[0]}@{s[1]}" for p, s in shapes.items())
        print(f"{preset:8s} float16 {fp16 / 1e6:6.2f} MB  int8 {fp16 / 2e6:6.2f} MB  | {layers}")


if __name__ == "__main__":
    main()
