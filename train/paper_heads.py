"""The two papers' official segmentation modules, exact in architecture and parameter count.

- ``iosd`` IOSD's ``Segmodule`` (50,032,256 parameters on IOSD's SDXL layout): three resolution
  groups, each bilinearly resized to twice its side and reduced by a bias-free 1x1 conv
  (7040->32 @32, 4160->64 @64, 2560->128 @128). Level 0 is the low map upsampled to the next
  group's size; every further level is a SegBlock over (previous level, own reduced group),
  upsampled to the next size; a last SegBlock (224->256) gives the 256-channel final map at 256.
  The class embedding goes through an MLP (2048->1024->1024->512); every level re-projects the query
  with its own bias-free ``to_q`` and runs its own 3 decoder layers against its 4x4 patches
  (256 / 1024 / 4096 tokens of 512 / 1536 / 3584 values, each level its own bias-free ``to_k``).
  An MLP (512->1024->1024->256) gives the mask embedding; logits are its dot product with the final
  map at 512.
- ``gd`` Grounded Diffusion's ``Segmodule`` (18,796,560 parameters on SD 1.x with both guidance
  halves): four groups reduced by bias-free 1x1 convs to 16/32/64/128 channels, every group but
  the highest resized to twice its side first (the official code keeps the 64x64 group at 64);
  the running map is upsampled to each next group's size, concatenated with it and mixed by a
  SegBlock (48 @32, 112 @64, 240 @64). 4x4 patches of the 240-channel 64x64 map (256 tokens of
  3840) -> bias-free Linear to 512 as keys and values; the class embedding -> bias-free Linear to
  512 as the query; 3 decoder layers; an MLP (512->512->512->240); logits at 512.

SegBlock and decoder layer follow the official code (see shared/reference/notes.md): non-affine
BatchNorm (momentum 0.1, eps 1e-4), ReLU (in place in the official code, so the residual branch
is ReLU(BN(x)) too), spectrally normalised 3x3 convs (one power iteration, eps 1e-4) with bias,
a spectrally normalised 1x1 shortcut when the width changes; pre-norm decoder layer with
self-attention, cross-attention and a ReLU FFN, attention without bias, no positional encodings,
no final norm. As in the official code, a head's decoder layers are copies of one layer, so they
start from equal weights; everything else keeps PyTorch's default initialisation.

Where we differ from the official code, on purpose and without changing the function:
- attention is per image: the official code flattens the batch, so queries attend to every
  image's tokens (and to every image's queries); padded queries are masked out of
  self-attention and their logits are zero;
- a group's bias-free 1x1 reduction runs before its bilinear resize, and the mask logits are
  computed at the final map's side and then resized: both pairs of linear maps commute, so the
  result is the same function for a fraction of the memory and compute;
- spectral norm is torch's parametrization (its power iteration is warmed up at construction;
  BigGAN's SNConv2d starts from a random vector): same parameters, same normalised weight.

BatchNorm in training mode uses batch statistics, so images of a batch influence each other
there (the official design); in eval mode a sample's output never depends on its batch mates.

This module depends on nothing in ``heads.py``; ``heads.py`` registers these heads and shares
:class:`FeatureHead` (the input contract) with its own lighter heads.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from iosd.errors import UserError
from iosd.layers import group_by_resolution

# The official layouts, for error messages: channels@side per resolution group at 512 px.
IOSD_OFFICIAL_LAYOUT = "IOSD's SDXL layout of 3 resolution groups (7040@16, 4160@32, 2560@64; the iosd layer preset)"
GD_OFFICIAL_LAYOUT = "GD's SD 1.x layout of 4 resolution groups (2x(7680@8, 7040@16, 4160@32, 2560@64); the gd layer preset)"


def layout_groups(layout: dict) -> list[tuple[int, list[str]]]:
    """(side, layer paths) per resolution group, lowest resolution first."""
    shapes = {path: shape for path, shape in layout["layers"]}
    return [(shapes[paths[0]][-1], paths) for paths in group_by_resolution(shapes)]


class FeatureHead(nn.Module):
    """The contract of every head: cached features + class embeddings -> mask logits.

    ``forward(features {path: (B, C, H, W)}, queries (B, Q, D), query_mask (B, Q) bool | None)``
    returns logits (B, Q, S, S), S = ``config["mask_size"]``; padded queries give zeros.
    ``config`` holds every choice, so ``build_head(**config)`` rebuilds the same network.
    Subclasses name their options in ``OPTIONS`` and spell out a config in ``resolve_config``.
    """

    OPTIONS: tuple[str, ...] = ()

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        self.shapes = {path: tuple(shape) for path, shape in self.config["layout"]["layers"]}
        self.groups = layout_groups(self.config["layout"])

    @classmethod
    def resolve_config(cls, kind: str, layout: dict, options: dict) -> dict:
        """Every architectural choice for ``layout`` (already checked) and ``options``."""
        raise NotImplementedError

    def _check_inputs(self, features: dict[str, Tensor], queries: Tensor, query_mask: Tensor | None) -> None:
        dim = self.config["layout"]["embedding_dim"]
        if queries.dim() != 3 or queries.shape[-1] != dim:
            raise UserError(f"queries have shape {tuple(queries.shape)}, expected (B, Q, {dim})", "use class embeddings of the head's dataset")
        batch = queries.shape[0]
        for path, shape in self.shapes.items():
            if path not in features:
                raise UserError(f"feature layer {path} is missing", "use features with the head's layout")
            got = tuple(features[path].shape)
            if got != (batch, *shape):
                raise UserError(f"feature layer {path} has shape {got}, expected {(batch, *shape)}", "use features with the head's layout")
        if query_mask is not None and tuple(query_mask.shape) != tuple(queries.shape[:2]):
            raise UserError(f"query_mask has shape {tuple(query_mask.shape)}, expected {tuple(queries.shape[:2])}")

    @staticmethod
    def _query_mask(queries: Tensor, query_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(real queries (B, Q) bool, self-attention key padding (B, Q) bool, None without a mask)."""
        if query_mask is None:
            return torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device), None
        query_mask = query_mask.to(device=queries.device, dtype=torch.bool)
        # An image with no real query would mask every key (NaN softmax); its rows are padding anyway.
        return query_mask, ~query_mask & query_mask.any(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------- options


def _int_option(name: str, value, minimum: int = 1) -> int:
    """An integer option >= minimum, or a UserError naming it."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    if number is None or number < minimum:
        raise UserError(f"head option {name} must be an integer >= {minimum}, not {value!r}", "or leave it unset for the official value")
    return number


def _dropout_option(value) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = -1.0
    if isinstance(value, bool) or not 0.0 <= rate < 1.0:
        raise UserError(f"head option dropout must be a number in [0, 1), not {value!r}", "or leave it unset for the official value")
    return rate


def _widths(kind: str, value, groups: list, default: list[int], expected: str) -> list[int]:
    """One reduction width per resolution group: the official ones on the official layout."""
    sides = [side for side, _ in groups]
    if value is None:
        if len(groups) != len(default):
            raise UserError(
                f"the {kind} head's default widths {default} fit {expected}; this layout has {len(groups)} resolution group(s) (sides {sides})",
                f"capture the {kind} layer preset, or pass visual_channels with one width per group",
            )
        return list(default)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != len(groups):
        raise UserError(f"visual_channels needs {len(groups)} widths, one per resolution group (sides {sides}), not {value!r}", "or leave it unset on the official layout")
    return [_int_option("visual_channels", v) for v in value]


def _resolve_visual(kind: str, layout: dict, options: dict, defaults: dict, official_layout: str) -> tuple[dict, dict, list]:
    """Options both paper heads share: the decoder's sizes, dropout, patch, mask size (8x the
    highest side) and one reduction width per resolution group. Returns the config, the options
    given (None dropped) and the layout's resolution groups, for each head's own options."""
    config = {"kind": kind, "layout": layout}
    given = {k: v for k, v in options.items() if v is not None}
    groups = layout_groups(layout)
    for name in ("d_model", "heads", "ffn", "patch"):
        config[name] = _int_option(name, given.get(name, defaults[name]))
    if config["d_model"] % config["heads"]:
        raise UserError(f"d_model {config['d_model']} is not divisible by heads {config['heads']}", "pick heads dividing d_model")
    config["dropout"] = _dropout_option(given.get("dropout", defaults["dropout"]))
    top = max(side for side, _ in groups)
    config["mask_size"] = _int_option("mask_size", given.get("mask_size", 8 * top))
    config["visual_channels"] = _widths(kind, given.get("visual_channels"), groups, defaults["visual_channels"], official_layout)
    return config, given, groups


def _check_patch(patch: int, sides: list[int]) -> None:
    bad = [side for side in sides if side % patch]
    if bad:
        raise UserError(f"patch {patch} does not divide the attended map side(s) {bad}", f"pick a patch dividing {sides}")


# ----------------------------------------------------------------------------------- blocks


def _sn_conv(channels_in: int, channels_out: int, kernel: int) -> nn.Module:
    """A conv with bias under spectral normalisation (one power iteration, eps 1e-4), as BigGAN's SNConv2d."""
    conv = nn.Conv2d(channels_in, channels_out, kernel, padding=kernel // 2)
    return spectral_norm(conv, n_power_iterations=1, eps=1e-4)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-4, momentum=0.1, affine=False)


def _resize(x: Tensor, side: int) -> Tensor:
    return x if x.shape[-1] == side else F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


class SegBlock(nn.Module):
    """BN -> ReLU -> SN conv3x3 -> BN -> ReLU -> SN conv3x3, plus ReLU(BN(x)) (1x1 SN conv if widths differ)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.norm1 = _batch_norm(channels_in)
        self.conv1 = _sn_conv(channels_in, channels_out, 3)
        self.norm2 = _batch_norm(channels_out)
        self.conv2 = _sn_conv(channels_out, channels_out, 3)
        self.shortcut = _sn_conv(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # The official ReLU is in place: the residual branch becomes ReLU(BN(x)) as well.
        x = F.relu(self.norm1(x), inplace=True)
        h = self.conv2(F.relu(self.norm2(self.conv1(x)), inplace=True))
        return h + self.shortcut(x)


class MLP(nn.Module):
    """Linear layers with bias, ReLU between them (DETR's MLP; every head's query and mask MLPs)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, layers: int = 3) -> None:
        super().__init__()
        dims = [dim_in] + [hidden] * (layers - 1) + [dim_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PreNormDecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer without positions: self-attention, cross-attention, ReLU FFN."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, bias=False, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, bias=False, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, query: Tensor, memory: Tensor, padding: Tensor | None) -> Tensor:
        """query (B, Q, d); memory (B, N, d) of the same image; padding (B, Q) True = ignore, or None."""
        h = self.norm1(query)
        query = query + self.dropout1(self.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0])
        h = self.norm2(query)
        query = query + self.dropout2(self.cross_attn(h, memory, memory, need_weights=False)[0])
        h = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(query)))))
        return query + self.dropout3(h)


class Decoder(nn.Module):
    """A stack of decoder layers, no final norm.

    Its layers are copies of ``prototype``, as in the official code (DETR's ``_get_clones``
    without DETR's re-initialisation): they start from the same weights.
    """

    def __init__(self, layers: int, prototype: PreNormDecoderLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(prototype) for _ in range(layers))

    def forward(self, query: Tensor, memory: Tensor, padding: Tensor | None) -> Tensor:
        for layer in self.layers:
            query = layer(query, memory, padding)
        return query


class GroupReduction(nn.Module):
    """A resolution group's maps concatenated, reduced by a bias-free 1x1 conv, resized to ``side``.

    The official code resizes first; the bias-free 1x1 conv and the bilinear resize commute, so
    reducing first gives the same map with far less memory and compute.
    """

    def __init__(self, paths: list[str], channels_in: int, channels_out: int, side: int) -> None:
        super().__init__()
        self.paths = list(paths)
        self.side = side
        self.conv = nn.Conv2d(channels_in, channels_out, 1, bias=False)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        x = torch.cat([features[p] for p in self.paths], dim=1) if len(self.paths) > 1 else features[self.paths[0]]
        return _resize(self.conv(x), self.side)


def _patch_tokens(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H*W/patch^2, C*patch^2): non-overlapping patches, channel-major."""
    return F.unfold(x, patch, stride=patch).transpose(1, 2)


def _logits(embedding: Tensor, pixels: Tensor, size: int, query_mask: Tensor) -> Tensor:
    """Dot products of (B, Q, C) embeddings with (B, C, h, w) pixels, resized to size x size.

    Same as the official dot product with the map resized first (both linear): Q maps get resized, not C.
    """
    logits = _resize(torch.einsum("bqc,bchw->bqhw", embedding, pixels), size)
    return logits.masked_fill(~query_mask[:, :, None, None], 0.0)


# ------------------------------------------------------------------------------------ heads


class IOSDHead(FeatureHead):
    """IOSD's official Segmodule: a level per resolution group, each with its own decoder."""

    OPTIONS = ("visual_channels", "final_channels", "d_model", "heads", "ffn", "layers_per_level", "dropout", "patch", "query_mlp_hidden", "mask_mlp_hidden", "mask_size")
    DEFAULTS = {"visual_channels": [32, 64, 128], "final_channels": 256, "d_model": 512, "heads": 8, "ffn": 2048, "layers_per_level": 3, "dropout": 0.3, "patch": 4}

    @classmethod
    def resolve_config(cls, kind: str, layout: dict, options: dict) -> dict:
        d = cls.DEFAULTS
        config, given, groups = _resolve_visual(kind, layout, options, d, IOSD_OFFICIAL_LAYOUT)
        config["final_channels"] = _int_option("final_channels", given.get("final_channels", d["final_channels"]))
        config["layers_per_level"] = _int_option("layers_per_level", given.get("layers_per_level", d["layers_per_level"]))
        # The official MLPs are 2048 -> 2*d -> d and d -> 2*d -> 256.
        for name in ("query_mlp_hidden", "mask_mlp_hidden"):
            config[name] = _int_option(name, given.get(name, 2 * config["d_model"]))
        _check_patch(config["patch"], cls.level_sides([side for side, _ in groups]))
        return config

    @staticmethod
    def group_sides(sides: list[int]) -> list[int]:
        """Every group resized to twice its side (16, 32, 64 -> 32, 64, 128)."""
        return [2 * side for side in sides]

    @classmethod
    def level_sides(cls, sides: list[int]) -> list[int]:
        """Side of each attended level: the next group's size, twice the last one's (64, 128, 256)."""
        resized = cls.group_sides(sides)
        return [*resized[1:], 2 * resized[-1]]

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        c = self.config
        sides = [side for side, _ in self.groups]
        widths = c["visual_channels"]
        cumulative = [sum(widths[: i + 1]) for i in range(len(widths))]
        self.level_side = self.level_sides(sides)
        self.reductions = nn.ModuleList(
            GroupReduction(paths, sum(self.shapes[p][0] for p in paths), width, side)
            for (_, paths), width, side in zip(self.groups, widths, self.group_sides(sides), strict=True)
        )
        # level 0 is the reduced low group alone; level i mixes level i-1 with its own group
        self.mix_blocks = nn.ModuleList(SegBlock(w, w) for w in cumulative[1:])
        self.final_block = SegBlock(cumulative[-1], c["final_channels"])
        d, patch = c["d_model"], c["patch"]
        self.query_mlp = MLP(c["layout"]["embedding_dim"], c["query_mlp_hidden"], d)
        self.to_q = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in cumulative)
        self.to_k = nn.ModuleList(nn.Linear(width * patch * patch, d, bias=False) for width in cumulative)
        # one prototype layer for every level, as in the official code: all 9 layers start equal
        prototype = PreNormDecoderLayer(d, c["heads"], c["ffn"], c["dropout"])
        self.decoders = nn.ModuleList(Decoder(c["layers_per_level"], prototype) for _ in cumulative)
        self.mask_mlp = MLP(d, c["mask_mlp_hidden"], c["final_channels"])

    def encode(self, features: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """The attended level maps (low to high) and the final map (at twice the last level's group size)."""
        levels, x = [], None
        for i, reduction in enumerate(self.reductions):
            own = reduction(features)
            x = own if x is None else self.mix_blocks[i - 1](torch.cat([x, own], dim=1))
            x = _resize(x, self.level_side[i])
            levels.append(x)
        return levels, self.final_block(x)

    def forward(self, features: dict[str, Tensor], queries: Tensor, query_mask: Tensor | None = None) -> Tensor:
        """Mask logits (B, Q, S, S) for class embeddings ``queries`` (B, Q, D) on ``features``."""
        self._check_inputs(features, queries, query_mask)
        query_mask, padding = self._query_mask(queries, query_mask)
        levels, final = self.encode(features)
        query = self.query_mlp(queries)
        for level, to_q, to_k, decoder in zip(levels, self.to_q, self.to_k, self.decoders, strict=True):
            query = decoder(to_q(query), to_k(_patch_tokens(level, self.config["patch"])), padding)
        return _logits(self.mask_mlp(query), final, self.config["mask_size"], query_mask)


class GDHead(FeatureHead):
    """Grounded Diffusion's official Segmodule: one mixed map, one decoder over its patches."""

    OPTIONS = ("visual_channels", "d_model", "heads", "ffn", "layers", "dropout", "patch", "mask_mlp_hidden", "mask_size")
    DEFAULTS = {"visual_channels": [16, 32, 64, 128], "d_model": 512, "heads": 8, "ffn": 2048, "layers": 3, "dropout": 0.0, "patch": 4}

    @classmethod
    def resolve_config(cls, kind: str, layout: dict, options: dict) -> dict:
        d = cls.DEFAULTS
        config, given, groups = _resolve_visual(kind, layout, options, d, GD_OFFICIAL_LAYOUT)
        config["layers"] = _int_option("layers", given.get("layers", d["layers"]))
        # The official mask MLP is d -> d -> 240.
        config["mask_mlp_hidden"] = _int_option("mask_mlp_hidden", given.get("mask_mlp_hidden", config["d_model"]))
        _check_patch(config["patch"], [cls.group_sides([side for side, _ in groups])[-1]])
        return config

    @staticmethod
    def group_sides(sides: list[int]) -> list[int]:
        """Every group but the highest resized to twice its side (8, 16, 32, 64 -> 16, 32, 64, 64)."""
        return [2 * side for side in sides[:-1]] + sides[-1:]

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        c = self.config
        widths = c["visual_channels"]
        cumulative = [sum(widths[: i + 1]) for i in range(len(widths))]
        self.reductions = nn.ModuleList(
            GroupReduction(paths, sum(self.shapes[p][0] for p in paths), width, side)
            for (_, paths), width, side in zip(self.groups, widths, self.group_sides([s for s, _ in self.groups]), strict=True)
        )
        self.mix_blocks = nn.ModuleList(SegBlock(w, w) for w in cumulative[1:])
        d, patch = c["d_model"], c["patch"]
        self.to_k = nn.Linear(cumulative[-1] * patch * patch, d, bias=False)
        self.to_q = nn.Linear(c["layout"]["embedding_dim"], d, bias=False)
        self.decoder = Decoder(c["layers"], PreNormDecoderLayer(d, c["heads"], c["ffn"], c["dropout"]))
        self.mask_mlp = MLP(d, c["mask_mlp_hidden"], cumulative[-1])

    def encode(self, features: dict[str, Tensor]) -> Tensor:
        """The mixed map (sum of the widths, 240 channels at the highest group's side)."""
        x = None
        for i, reduction in enumerate(self.reductions):
            own = reduction(features)
            x = own if x is None else self.mix_blocks[i - 1](torch.cat([_resize(x, own.shape[-1]), own], dim=1))
        return x

    def forward(self, features: dict[str, Tensor], queries: Tensor, query_mask: Tensor | None = None) -> Tensor:
        """Mask logits (B, Q, S, S) for class embeddings ``queries`` (B, Q, D) on ``features``."""
        self._check_inputs(features, queries, query_mask)
        query_mask, padding = self._query_mask(queries, query_mask)
        pixels = self.encode(features)
        tokens = self.to_k(_patch_tokens(pixels, self.config["patch"]))
        query = self.decoder(self.to_q(queries), tokens, padding)
        return _logits(self.mask_mlp(query), pixels, self.config["mask_size"], query_mask)
