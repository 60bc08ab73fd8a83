"""Pictures people look at: mask overlays, titled grids, and atomic PNG writes.

Shared by every stage (shard previews, training curves' sample panels, evaluation
figures) so that all pictures use the same colours and layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from iosd.errors import UserError, name_path
from iosd.manifest import mkstemp_shared

# Distinct, saturated colours (Tableau-like), cycled when there are more masks.
PALETTE = np.array(
    [
        (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
        (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
        (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
    ],
    np.uint8,
)
TITLE_HEIGHT = 14
BACKGROUND = (255, 255, 255)


def colour(index: int) -> tuple[int, int, int]:
    """The colour of mask number ``index`` (the same in every picture)."""
    return tuple(int(c) for c in PALETTE[index % len(PALETTE)])


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from uint8 or float [0, 1] images, grey (H, W) or RGBA inputs."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.nan_to_num(arr.astype(np.float32)) * 255 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise UserError(f"cannot draw an array of shape {tuple(np.shape(image))}", "pass (H, W), (H, W, 3) or (H, W, 4) pixels")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[..., :3])


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)) > 127


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def overlay(image: np.ndarray, masks: np.ndarray, labels: list[str] | None = None, alpha: float = 0.5) -> np.ndarray:
    """``image`` with each mask tinted in its own colour and outlined; ``labels`` adds a legend.

    Masks at another resolution than the image (predictions at feature size) are resized
    with nearest neighbours."""
    rgb = to_rgb_uint8(image)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if labels is not None and len(labels) != len(masks):
        raise UserError(f"{len(labels)} labels for {len(masks)} masks", "pass one label per mask")
    out = rgb.astype(np.float32)
    shape = rgb.shape[:2]
    for i, mask in enumerate(masks):
        m = _resize_mask(np.asarray(mask) > 0, shape)
        tint = np.array(colour(i), np.float32)
        out[m] = out[m] * (1 - alpha) + tint * alpha
        out[_outline(m)] = tint
    result = out.astype(np.uint8)
    if labels:
        result = _legend(result, labels)
    return result


def _legend(image: np.ndarray, labels: list[str]) -> np.ndarray:
    """Coloured boxes with label text in the top-left corner, on a dark backing."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    line = TITLE_HEIGHT - 2
    width = max(draw.textlength(text, font=font) for text in labels) + line + 6
    draw.rectangle((0, 0, width, line * len(labels) + 2), fill=(0, 0, 0))
    for i, text in enumerate(labels):
        y = 1 + i * line
        draw.rectangle((2, y + 2, line - 2, y + line - 2), fill=colour(i))
        draw.text((line + 2, y), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def _fit(tile_img: np.ndarray, side: int) -> Image.Image:
    """A tile scaled to fit a side x side square, centred on white."""
    img = Image.fromarray(to_rgb_uint8(tile_img))
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.NEAREST if scale >= 2 else Image.BILINEAR
    img = img.resize(size, resample)
    square = Image.new("RGB", (side, side), BACKGROUND)
    square.paste(img, ((side - size[0]) // 2, (side - size[1]) // 2))
    return square


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def grid(tiles: list[np.ndarray], titles: list[str] | None = None, ncols: int = 4, tile: int = 192) -> Image.Image:
    """Tiles (arrays) resized to ``tile`` px squares in rows of ``ncols``, each under its title."""
    if not tiles:
        raise UserError("nothing to draw: no tiles", "pass at least one image")
    if titles is not None and len(titles) != len(tiles):
        raise UserError(f"{len(titles)} titles for {len(tiles)} tiles", "pass one title per tile")
    if ncols < 1 or tile < 8:
        raise UserError(f"grid needs ncols >= 1 and tile >= 8 px (got {ncols}, {tile})", "pass larger values")
    ncols = min(ncols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    band = TITLE_HEIGHT if titles is not None else 0
    sheet = Image.new("RGB", (ncols * tile, nrows * (tile + band)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, arr in enumerate(tiles):
        x, y = (i % ncols) * tile, (i // ncols) * (tile + band)
        sheet.paste(_fit(arr, tile), (x, y + band))
        if titles is not None:
            draw.text((x + 2, y + 1), _clip_text(draw, titles[i], font, tile - 4), fill=(0, 0, 0), font=font)
    return sheet


def save_png_atomic(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG under a temp name in the target directory, then rename: never half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp_shared(path)  # 0o666 less the umask, like any other tool's output
    except OSError as err:
        raise UserError(f"cannot write {path} ({err.strerror})", "choose a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        name_path(err, path)
        raise
    return path
