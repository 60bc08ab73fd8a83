"""Feature-layer presets: which UNet modules are captured, by module path.

Paths name modules of diffusers' SDXL ``UNet2DConditionModel`` (the tiny model shares
the class and block layout, so the same paths exist there). The resolution of each layer
is measured at capture time and recorded in the manifest; heads group layers by it.

Cost per sample at 512 px with SDXL-Turbo (64x64 latent), float16, measured with
``python bench/presets.py`` (the UNet built on the meta device from the SDXL config):

=========  ======================================================  ============
preset     layers (channels@side)                                  bytes/sample
=========  ======================================================  ============
compact    up0.attn2 1280@16, up1.attn2 640@32, up2.res2 320@64     4.59 MB
iosd       mid 1280@16, up0.attn0-2 1280@16, up1.attn0-2 640@32,    14.4 MB
           up2.res0-2 320@64
gd         down0-2 320@32 640@16 1280@16, mid 1280@16, up0-2        12.8 MB
           1280@32 640@64 320@64 (every block, grouped by side)
=========  ======================================================  ============
"""

from __future__ import annotations

from iosd.errors import UserError

PRESETS: dict[str, tuple[str, ...]] = {
    # Last decoder layer at each resolution: the cheapest pyramid that still has 64x64.
    "compact": (
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.2",
        "up_blocks.2.resnets.2",
    ),
    # IOSD: every decoder layer, grouped per resolution for the pyramid visual encoder.
    "iosd": (
        "mid_block",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
        "up_blocks.2.resnets.2",
    ),
    # Grounded Diffusion: every block of the encoder, the middle and the decoder.
    "gd": (
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ),
}
DEFAULT_PRESET = "compact"
FEATURE_DTYPES = ("float16", "bfloat16", "int8")


def resolve_layers(spec: str) -> tuple[str, ...]:
    """A preset name, or a comma-separated list of UNet module paths."""
    if spec in PRESETS:
        return PRESETS[spec]
    layers = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not layers or any(" " in p for p in layers) or ("." not in spec and spec not in ("mid_block",)):
        raise UserError(f"unknown feature layer preset {spec!r}", f"use one of {', '.join(PRESETS)} or comma-separated UNet module paths")
    return layers


def layer_key(path: str) -> str:
    """Array name of a layer inside feat.zarr.zip (zarr keys may not contain dots here)."""
    return path.replace(".", "-")


def group_by_resolution(shapes: dict[str, list[int]]) -> list[list[str]]:
    """Layer paths grouped by spatial side, lowest resolution first (C, H, W shapes)."""
    by_side: dict[int, list[str]] = {}
    for path, shape in shapes.items():
        by_side.setdefault(int(shape[-1]), []).append(path)
    return [by_side[s] for s in sorted(by_side)]
