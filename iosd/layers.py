"""Feature-layer presets: which UNet modules are captured, by module path, for which model family.

Paths name modules of diffusers' ``UNet2DConditionModel`` (the tiny models share the classes
and block layouts, so the same paths exist there). The resolution of each layer is measured
at capture time and recorded in the manifest; heads group layers by it.

Cost per sample at 512 px, float16, measured with ``python bench/presets.py`` (the UNets
built on the meta device from the real SDXL / SD 1.x configs):

=========  ======  ==========================================================  ============
preset     family  layers (channels@side)                                      bytes/sample
=========  ======  ==========================================================  ============
iosd       sdxl    IOSD's 19 maps: 7040@16, 4160@32, 2560@64                    33.1 MB
gd         sd      GD's 25 maps, both guidance halves: 2x(7680@8, 7040@16,      68.2 MB
                   4160@32, 2560@64)
compact    sdxl    up0.attn2 1280@16, up1.attn2 640@32, up2.res2 320@64          4.59 MB
decoder    sdxl    mid + every decoder layer: 1280@16 x4, 640@32 x3, 320@64 x3  14.4 MB
blocks     sdxl    every block output: 320@32 640@16 1280@16, mid, 1280@32      12.8 MB
                   640@64 320@64
=========  ======  ==========================================================  ============
"""

from __future__ import annotations

from dataclasses import dataclass

from iosd.errors import UserError

FAMILIES = ("sdxl", "sd")


@dataclass(frozen=True)
class Preset:
    family: str  # the UNet layout whose module paths these are
    layers: tuple[str, ...]
    doc: str


def _blocks(prefix: str, kind: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{kind}.{i}" for i in range(n))


PRESETS: dict[str, Preset] = {
    # IOSD's official hooks on the sgm UNet's input, middle and output blocks, as diffusers paths.
    "iosd": Preset("sdxl", (
        "conv_in",
        *_blocks("down_blocks.0", "resnets", 2), "down_blocks.0.downsamplers.0",
        *_blocks("down_blocks.1", "attentions", 2), "down_blocks.1.downsamplers.0",
        *_blocks("down_blocks.2", "attentions", 2),
        "mid_block",
        *_blocks("up_blocks.0", "attentions", 2), "up_blocks.0.upsamplers.0",
        *_blocks("up_blocks.1", "attentions", 2), "up_blocks.1.upsamplers.0",
        *_blocks("up_blocks.2", "resnets", 3),
    ), "IOSD: 19 maps of the encoder, middle and decoder (official hooks)"),
    # GD's official hooks: every SD 1.x input block (12), the middle block, every output block (12).
    "gd": Preset("sd", (
        "conv_in",
        *_blocks("down_blocks.0", "attentions", 2), "down_blocks.0.downsamplers.0",
        *_blocks("down_blocks.1", "attentions", 2), "down_blocks.1.downsamplers.0",
        *_blocks("down_blocks.2", "attentions", 2), "down_blocks.2.downsamplers.0",
        *_blocks("down_blocks.3", "resnets", 2),
        "mid_block",
        *_blocks("up_blocks.0", "resnets", 2), "up_blocks.0.upsamplers.0",
        *_blocks("up_blocks.1", "attentions", 2), "up_blocks.1.upsamplers.0",
        *_blocks("up_blocks.2", "attentions", 2), "up_blocks.2.upsamplers.0",
        *_blocks("up_blocks.3", "attentions", 3),
    ), "Grounded Diffusion: 25 maps, every input, middle and output block of SD 1.x"),
    # Last decoder layer at each resolution: the cheapest pyramid that still has 64x64.
    "compact": Preset("sdxl", (
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.2",
        "up_blocks.2.resnets.2",
    ), "the last decoder layer per resolution"),
    # Every decoder layer, grouped per resolution (iosd's "iosd" preset before recipes).
    "decoder": Preset("sdxl", (
        "mid_block",
        *_blocks("up_blocks.0", "attentions", 3),
        *_blocks("up_blocks.1", "attentions", 3),
        *_blocks("up_blocks.2", "resnets", 3),
    ), "the middle block and every decoder layer"),
    # Every block output of the encoder, the middle and the decoder (iosd's "gd" preset before recipes).
    "blocks": Preset("sdxl", (
        *(f"down_blocks.{i}" for i in range(3)),
        "mid_block",
        *(f"up_blocks.{i}" for i in range(3)),
    ), "every block output: encoder, middle, decoder"),
}
DEFAULT_PRESET = "compact"
FEATURE_DTYPES = ("float16", "bfloat16", "int8", "fp8")


def resolve_layers(spec: str) -> tuple[str, ...]:
    """A preset name, or a comma-separated list of UNet module paths."""
    if spec in PRESETS:
        return PRESETS[spec].layers
    layers = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not layers or any(" " in p for p in layers) or ("." not in spec and spec not in ("mid_block",)):
        raise UserError(f"unknown feature layer preset {spec!r}", f"use one of {', '.join(PRESETS)} or comma-separated UNet module paths")
    return layers


def check_family(spec: str, family: str, model: str) -> None:
    """Refuse a preset written for another UNet layout than the loaded model's."""
    preset = PRESETS.get(spec)
    if preset is not None and preset.family != family:
        fits = ", ".join(n for n, p in PRESETS.items() if p.family == family)
        raise UserError(f"layer preset {spec!r} names {preset.family.upper()} UNet modules, but {model} is a {family.upper()} model", f"use --layers {fits} (or a recipe of that family)")


def layer_key(path: str) -> str:
    """Array name of a layer inside feat.zarr.zip (zarr keys may not contain dots here)."""
    return path.replace(".", "-")


def group_by_resolution(shapes: dict[str, list[int]]) -> list[list[str]]:
    """Layer paths grouped by spatial side, lowest resolution first (C, H, W shapes)."""
    by_side: dict[int, list[str]] = {}
    for path, shape in shapes.items():
        by_side.setdefault(int(shape[-1]), []).append(path)
    return [by_side[s] for s in sorted(by_side)]
