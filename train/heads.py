"""Grounding heads: cached UNet features + a class embedding -> mask logits.

Four architectures share one interface (``build_head(kind, layout, **options)``, see
:class:`~iosd.train.paper_heads.FeatureHead`); ``HEADS`` maps each kind to its class:

- ``iosd`` / ``gd``: the papers' official segmentation modules, exact in architecture and
  parameter count (``paper_heads.py``): IOSD's Segmodule (50,032,256 parameters on SDXL) and
  Grounded Diffusion's (18,796,560 on SD 1.x), with attention made per image.
- ``gd-lite`` Grounded Diffusion's design, lighter: the resolution groups are reduced by 1x1
  convs and mixed from low to high into one per-pixel map; 3 DETR decoder layers let the class
  queries attend to that map's patches.
- ``iosd-lite`` IOSD's design, lighter: every resolution group gets its own conv block and joins
  the previous level, giving one map per level (low ... high, final); the fusion decoder has one
  layer per level and visits the levels in that order, refining the query from coarse to fine.

Unlike the published GD code, attention is batched per image (queries never see another
image) and padded queries are masked out of self-attention. The lite heads use only per-sample
norms (GroupNorm/LayerNorm), so a sample's output never depends on its batch mates; the
official modules keep their BatchNorm, which couples the images of a batch in training mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from iosd.choices import HEAD_KINDS
from iosd.errors import UserError
from iosd.train.paper_heads import MLP, FeatureHead, GDHead, IOSDHead, layout_groups

# Paper defaults (GD code: d=512, 8 heads, 3 layers, FFN 2048, no dropout, 240 channels,
# keys/values from 4x4 patches of the 64x64 map: 256 tokens at 512 px).
DEFAULTS = {
    "d_model": 512,
    "heads": 8,
    "ffn": 2048,
    "dropout": 0.0,
    "patch": 4,
}
GD_LAYERS = 3
OPTION_NAMES = ("layers", "visual_channels", "mask_size", *DEFAULTS)  # the lite heads' options


def build_head(kind: str, layout: dict, **options) -> FeatureHead:
    """The head named ``kind`` for features shaped as in ``layout`` (see feature_layout)."""
    cls = HEADS.get(kind)
    if cls is None:
        raise UserError(f"unknown head kind {kind!r}", f"use one of {', '.join(KINDS)}")
    unknown = sorted(set(options) - set(cls.OPTIONS))
    if unknown:
        raise UserError(f"unknown head option(s) {', '.join(unknown)} for a {kind} head", f"use {', '.join(cls.OPTIONS)}")
    return cls(cls.resolve_config(kind, _check_layout(layout), options))


def head_gflops(kind: str, layout: dict, queries: int = 2, **options) -> float:
    """Training cost per sample: GFLOP of one forward and backward pass, batch 1, ``queries`` classes.

    Counted by torch's FlopCounterMode on the meta device (matmuls, convs, attention; norms,
    activations and resizes are not counted), with the parameters trainable, the features not.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        head = build_head(kind, layout, **options).train()
        features = {path: torch.empty(1, *shape) for path, shape in head.config["layout"]["layers"]}
        embeddings = torch.empty(1, int(queries), head.config["layout"]["embedding_dim"])
    with FlopCounterMode(display=False) as counter:
        head(features, embeddings).sum().backward()
    return counter.get_total_flops() / 1e9


def _check_layout(layout: dict) -> dict:
    """A clean copy of the layout, or a UserError saying what is wrong with it."""
    fix = 'pass {"layers": [[path, [C, H, W]], ...], "embedding_dim": D} (iosd.manifest.feature_layout)'
    try:
        layers = [[str(path), [int(v) for v in shape]] for path, shape in layout["layers"]]
        dim = int(layout["embedding_dim"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"malformed feature layout ({err})", fix) from None
    if not layers or dim < 1:
        raise UserError("feature layout has no layers or no embedding width", fix)
    if len({path for path, _ in layers}) != len(layers):
        raise UserError("feature layout names a layer twice", fix)
    for path, shape in layers:
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"layer {path} has shape {shape}, not [C, H, W]", fix)
        if shape[1] != shape[2]:
            raise UserError(f"layer {path} is {shape[1]}x{shape[2]}: heads need square feature maps", "generate square images")
    return {"layers": layers, "embedding_dim": dim}


def _resolve_config(kind: str, layout: dict, options: dict, pyramid: bool) -> dict:
    """The lite heads' choices spelled out, so build_head(**config) rebuilds the same net."""
    config = {"kind": kind, "layout": layout, **DEFAULTS}
    config.update({k: v for k, v in options.items() if k in DEFAULTS and v is not None})
    groups = _groups(layout)
    sides = [side for side, _ in groups]
    levels = len(groups) + 1 if pyramid else None
    layers = options.get("layers")
    if pyramid and layers is not None and int(layers) != levels:
        raise UserError(f"{kind} uses one fusion layer per pyramid level ({levels} here), not {layers}", f"leave layers unset for {kind}")
    config["layers"] = int(layers if layers is not None else (levels or GD_LAYERS))
    channels = options.get("visual_channels")
    if channels is None:
        channels = [_default_width(side) for side in sides]
    channels = [int(c) for c in channels]
    if len(channels) != len(groups) or min(channels) < 1:
        raise UserError(f"visual_channels needs {len(groups)} positive widths (one per resolution group {sides})", "or leave it unset")
    config["visual_channels"] = channels
    mask_size = options.get("mask_size")
    config["mask_size"] = int(mask_size) if mask_size is not None else max(sides)
    for name in ("d_model", "heads", "ffn", "layers", "mask_size", "patch"):
        config[name] = int(config[name])
        if config[name] < 1:
            raise UserError(f"head option {name} must be a positive integer, not {config[name]}")
    if config["d_model"] % config["heads"]:
        raise UserError(f"d_model {config['d_model']} is not divisible by heads {config['heads']}", "pick heads dividing d_model")
    config["dropout"] = float(config["dropout"])
    if not 0.0 <= config["dropout"] < 1.0:
        raise UserError(f"dropout {config['dropout']} is outside [0, 1)")
    return config


_groups = layout_groups  # (side, layer paths) per resolution group, lowest resolution first


def _default_width(side: int) -> int:
    """GD's 1x1 reduction widths as a rule: twice the side, 8/16/32/64 -> 16/32/64/128 (240 in all)."""
    return min(max(2 * side, 16), 128)


def _patch_size(side: int, patch: int) -> int:
    """GD's patch (4: 64x64 -> 256 tokens), smaller where a map would get under a 4x4 token grid."""
    return next(p for p in range(min(patch, max(side // 4, 1)), 0, -1) if side % p == 0)


def _group_norm(channels: int) -> nn.GroupNorm:
    """Per-sample normalisation (BatchNorm would couple the images of a batch)."""
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class MixBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convs (GD's mix-conv, GroupNorm for BN)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.norm2 = _group_norm(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        h = self.conv2(F.relu(self.norm2(h)))
        return self.shortcut(x) + h


def sine_positions(side: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """DETR 2-D sine encoding of a side x side token grid, (side*side, dim); no weights, any size."""
    quarter = dim // 4
    freqs = 10000.0 ** (-torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1))
    coords = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 * math.pi
    angles = coords[:, None] * freqs[None]  # (side, quarter)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, 2*quarter)
    grid = torch.cat([axis[:, None].expand(side, side, -1), axis[None].expand(side, side, -1)], dim=2)
    grid = F.pad(grid.reshape(side * side, 4 * quarter), (0, dim - 4 * quarter))
    return grid.to(dtype)


class PatchTokens(nn.Module):
    """A (B, C, H, W) map cut into patches and projected to tokens: the decoder's keys/values."""

    def __init__(self, channels: int, side: int, d_model: int, patch: int) -> None:
        super().__init__()
        self.patch = _patch_size(side, patch)
        self.grid = side // self.patch
        self.proj = nn.Linear(channels * self.patch**2, d_model, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens, positions), both (B, N, d_model) / (N, d_model)."""
        patches = F.unfold(x, self.patch, stride=self.patch).transpose(1, 2)
        tokens = self.proj(patches)
        return tokens, sine_positions(self.grid, tokens.shape[-1], x.device, tokens.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: query self-attention, cross-attention to tokens, FFN."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d_model))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.drops = nn.ModuleList(nn.Dropout(dropout) for _ in range(3))

    def forward(self, query: Tensor, tokens: Tensor, positions: Tensor, padding: Tensor) -> Tensor:
        """query (B, Q, d); tokens (B, N, d); positions (N, d); padding (B, Q) True = ignore."""
        h = self.norms[0](query)
        query = query + self.drops[0](self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0])
        h = self.norms[1](query)
        attended = self.cross_attn(h, tokens + positions, tokens, need_weights=False)[0]
        query = query + self.drops[1](attended)
        return query + self.drops[2](self.ffn(self.norms[2](query)))


class GroupReducer(nn.Module):
    """One resolution group: its layers concatenated along channels, then a bias-free 1x1 conv."""

    def __init__(self, paths: list[str], channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.paths = list(paths)
        self.conv = nn.Conv2d(channels_in, channels_out, 1, bias=False)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.conv(torch.cat([features[p] for p in self.paths], dim=1))


class GroundingHead(FeatureHead):
    """Common part of the lite heads: query projection, decoder stack, mask readout."""

    OPTIONS = OPTION_NAMES
    PYRAMID = False  # one decoder layer per pyramid level (iosd-lite) or GD_LAYERS over one map

    @classmethod
    def resolve_config(cls, kind: str, layout: dict, options: dict) -> dict:
        return _resolve_config(kind, layout, options, cls.PYRAMID)

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        c = self.config
        self.reducers = nn.ModuleList(
            GroupReducer(paths, sum(self.shapes[p][0] for p in paths), width)
            for (_, paths), width in zip(self.groups, c["visual_channels"], strict=True)
        )
        self.to_query = nn.Linear(c["layout"]["embedding_dim"], c["d_model"], bias=False)
        self.decoder = nn.ModuleList(DecoderLayer(c["d_model"], c["heads"], c["ffn"], c["dropout"]) for _ in range(c["layers"]))
        self.out_norm = nn.LayerNorm(c["d_model"])
        self.mask_mlp = MLP(c["d_model"], c["d_model"], sum(c["visual_channels"]), 3)

    def forward(self, features: dict[str, Tensor], queries: Tensor, query_mask: Tensor | None = None) -> Tensor:
        """Mask logits (B, Q, S, S) for class embeddings ``queries`` (B, Q, D) on ``features``."""
        self._check_inputs(features, queries, query_mask)
        if query_mask is None:
            query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
        query_mask = query_mask.to(device=queries.device, dtype=torch.bool)
        # An image with no real query would mask every key (NaN softmax); its rows are padding anyway.
        padding = ~query_mask & query_mask.any(dim=1, keepdim=True)
        levels, pixels = self.encode(features)
        query = self.to_query(queries)
        for layer, (tokens, positions) in zip(self.decoder, self.level_schedule(levels), strict=True):
            query = layer(query, tokens, positions, padding)
        mask_embedding = self.mask_mlp(self.out_norm(query))
        logits = torch.einsum("bqc,bchw->bqhw", mask_embedding, pixels)
        return logits.masked_fill(~query_mask[:, :, None, None], 0.0)

    def encode(self, features: dict[str, Tensor]) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Token sets (tokens, positions) for the decoder, and per-pixel features at mask_size."""
        raise NotImplementedError

    def level_schedule(self, levels: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Which token set each decoder layer attends to."""
        raise NotImplementedError

    def _to_mask_size(self, x: Tensor) -> Tensor:
        size = self.config["mask_size"]
        return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class GDLiteHead(GroundingHead):
    """gd-lite: one mixed per-pixel map; every decoder layer attends to its patches."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        widths = self.config["visual_channels"]
        cumulative = [sum(widths[: i + 1]) for i in range(len(widths))]
        self.mixers = nn.ModuleList(MixBlock(c, c) for c in cumulative)
        self.tokens = PatchTokens(cumulative[-1], self.groups[-1][0], self.config["d_model"], self.config["patch"])

    def encode(self, features):
        x = None
        for (side, _), reducer, mixer in zip(self.groups, self.reducers, self.mixers, strict=True):
            reduced = reducer(features)
            if x is not None:
                x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
                reduced = torch.cat([x, reduced], dim=1)
            x = mixer(reduced)
        return [self.tokens(x)], self._to_mask_size(x)

    def level_schedule(self, levels):
        return levels * len(self.decoder)


class IOSDLiteHead(GroundingHead):
    """iosd-lite: one map per resolution level plus a final one; one decoder layer each."""

    PYRAMID = True

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        widths = self.config["visual_channels"]
        cumulative = [sum(widths[: i + 1]) for i in range(len(widths))]
        d_model, patch = self.config["d_model"], self.config["patch"]
        # each level's own block mixes its reduced features with the previous level's output
        self.own_blocks = nn.ModuleList(MixBlock(c, c) for c in cumulative)
        self.final_block = MixBlock(cumulative[-1], cumulative[-1])
        sides = [side for side, _ in self.groups]
        self.tokens = nn.ModuleList(PatchTokens(c, s, d_model, patch) for c, s in zip([*cumulative, cumulative[-1]], [*sides, sides[-1]], strict=True))

    def encode(self, features):
        maps, x = [], None
        for (side, _), reducer, block in zip(self.groups, self.reducers, self.own_blocks, strict=True):
            own = reducer(features)
            if x is not None:  # combine with the previous level's output, then this level's conv
                own = torch.cat([F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False), own], dim=1)
            x = block(own)
            maps.append(x)
        final = self.final_block(x)
        maps.append(final)
        return [tokens(m) for tokens, m in zip(self.tokens, maps, strict=True)], self._to_mask_size(final)

    def level_schedule(self, levels):
        return levels


# kind -> head class: a new head is one entry here.
HEADS: dict[str, type[FeatureHead]] = {
    "iosd": IOSDHead,
    "gd": GDHead,
    "iosd-lite": IOSDLiteHead,
    "gd-lite": GDLiteHead,
}
KINDS = HEAD_KINDS  # the CLI's choices; tests check they are the keys of HEADS
