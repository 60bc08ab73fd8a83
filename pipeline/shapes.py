"""The built-in "shapes world": textured shapes on cluttered backgrounds, with exact masks.

It lets the whole pipeline (features, head, evaluation) run and be judged without a
detector: masks are exact, and each class has both its own geometry and its own hue
(jittered, textured) so that even a small head on *random-weight* UNet features can
tell classes apart. Backgrounds are muted clutter (smooth noise, blobs, thin lines),
never whole shapes, so a class cannot be confused with the background.

Masks are the *visible* pixels of each object (later objects occlude earlier ones);
placement is retried until every object keeps most of its area and at least
``MIN_VISIBLE`` of the image. Everything is drawn from the caller's ``rng`` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from iosd.classes import load_split
from iosd.errors import UserError

SHAPE_NAMES: tuple[str, ...] = load_split("shapes", 1).all
SIZE_RANGE = (0.5, 0.8)  # object extent as a fraction of the image side
MIN_VISIBLE = 0.03  # fraction of the image each object must keep visible
MAX_OCCLUDED = 0.25  # fraction of an object another one may cover
PLACEMENT_TRIES = 24
# How a scene is painted: "textured" (textured objects on muted clutter: the random-weight
# world's, where a small head must work for it) or "plain" (flat objects on a smooth field:
# what a small trained generator can learn to draw on a CPU; docs/cpu-world.md).
SCENE_STYLES: dict[str, bool] = {"textured": True, "plain": False}
MIN_SIZE_PX = 16

# ---------------------------------------------------------------------------------------
# Geometry: every class is an inside-test on local coordinates (u, v) in [-1, 1]^2,
# v pointing down as in the image.
# ---------------------------------------------------------------------------------------
Inside = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polygon(points: np.ndarray) -> Inside:
    """Even-odd point-in-polygon test, vectorised over pixels (one loop over edges)."""
    xs, ys = points[:, 0], points[:, 1]

    def inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        result = np.zeros(u.shape, bool)
        for i in range(len(xs)):
            x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
            if y0 == y1:
                continue
            crosses = (y0 > v) != (y1 > v)
            x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
            result ^= crosses & (u < x_at)
        return result

    return inside


def _regular(n: int, radius: float, phase: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular polygon (or a star when ``inner`` radius is given)."""
    count = 2 * n if inner else n
    angles = phase + np.arange(count) * 2 * np.pi / count
    radii = np.where(np.arange(count) % 2 == 0, radius, inner) if inner else np.full(count, radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = 1.15 * u, -1.15 * v + 0.2  # lobes up, point down
    r = x * x + y * y - 1
    return r * r * r - x * x * y * y * y < 0


def _crescent(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u * u + v * v < 1) & ((u - 0.5) ** 2 + v * v > 0.8**2)


def _ring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    return (r2 < 1) & (r2 > 0.52**2)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    return ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95))


ARROW = np.array([[-1.0, -0.3], [0.05, -0.3], [0.05, -0.75], [1.0, 0.0], [0.05, 0.75], [0.05, 0.3], [-1.0, 0.3]])

GEOMETRY: dict[str, Inside] = {
    "disc": lambda u, v: u * u + v * v < 1,
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.82,
    "triangle": _polygon(_regular(3, 1.05, -np.pi / 2) + [0, 0.2]),
    "star": _polygon(_regular(5, 1.0, -np.pi / 2, inner=0.58)),
    "ring": _ring,
    "cross": _cross,
    "heart": _heart,
    "crescent": _crescent,
    "hexagon": _polygon(_regular(6, 0.95, 0.0)),
    "diamond": lambda u, v: np.abs(u) / 0.6 + np.abs(v) < 1,
    "arrow": _polygon(ARROW),
    "ellipse": lambda u, v: u * u + (v / 0.6) ** 2 < 1,
}


@cache
def _unit_area(name: str) -> float:
    """Fraction of the [-1, 1]^2 box that a class covers (sets its smallest size)."""
    axis = (np.arange(200) + 0.5) / 100 - 1
    u, v = np.meshgrid(axis, axis)
    return float(GEOMETRY[name](u, v).mean())


# ---------------------------------------------------------------------------------------
# Colour: class hue (evenly spaced round the wheel, jittered), saturated, textured.
# ---------------------------------------------------------------------------------------
def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour as RGB floats in [0, 255]."""
    h6 = (h % 1.0) * 6
    i = int(h6) % 6
    f = h6 - int(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32) * 255


def class_hue(name: str) -> float:
    """Characteristic hue of a class in [0, 1)."""
    return SHAPE_NAMES.index(name) / len(SHAPE_NAMES)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int = 1) -> np.ndarray:
    """(H, W, channels) low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = (rng.random((cells, cells, channels)) * 255).astype(np.uint8)
    img = Image.fromarray(coarse if channels == 3 else coarse[..., 0], mode="RGB" if channels == 3 else "L")
    up = np.asarray(img.resize((shape[1], shape[0]), Image.BICUBIC), np.float32) / 255
    return up if channels == 3 else up[..., None]


def _texture(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A pattern in [0, 1] over the given pixel coordinates: stripes, checker or smooth noise."""
    kind = rng.integers(3)
    angle = rng.uniform(0, np.pi)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    if kind == 0:  # stripes
        period = np.float32(rng.uniform(0.05, 0.12))
        return (np.floor((xx * c + yy * s) / period) % 2).astype(np.float32)
    if kind == 1:  # checker
        period = np.float32(rng.uniform(0.05, 0.1))
        cells = np.floor((xx * c + yy * s) / period) + np.floor((yy * c - xx * s) / period)
        return (cells % 2).astype(np.float32)
    noise = _smooth_noise(rng, np.broadcast_shapes(xx.shape, yy.shape), int(rng.integers(3, 7)))[..., 0]
    return np.clip((noise - 0.5) * 2.5 + 0.5, 0, 1)


def _paint_object(rng: np.random.Generator, hue: float, xx: np.ndarray, yy: np.ndarray, textured: bool = True) -> np.ndarray:
    """(h, w, 3) colours of one object: two tones of ``hue`` mixed by a texture, or the light
    tone alone (the plain style)."""
    hue = hue + rng.uniform(-0.025, 0.025)
    light = _hsv(hue, rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0))
    if not textured:
        return np.broadcast_to(light, (*np.broadcast_shapes(xx.shape, yy.shape), 3))
    dark = _hsv(hue + rng.uniform(-0.01, 0.01), rng.uniform(0.75, 1.0), rng.uniform(0.4, 0.6))
    return light + (dark - light) * _texture(rng, xx, yy)[..., None]


# ---------------------------------------------------------------------------------------
# Background: muted clutter.
# ---------------------------------------------------------------------------------------
def _muted(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.25, 0.85))


def _background(rng: np.random.Generator, size: int, clutter: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 clutter: smooth muted colour field, irregular blobs, pixel noise, thin lines.

    Drawn with PIL at C speed; only the pixel noise is numpy."""
    cells = int(rng.integers(3, 7))
    coarse = _muted(rng) * 0.7 + (rng.random((cells, cells, 3)) - 0.5) * rng.uniform(40, 90) + 40
    canvas = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    if not clutter:
        return np.array(canvas)
    for _ in range(int(rng.integers(2, 5))):  # blobs: thresholded smooth noise
        cells = int(rng.integers(5, 10))
        noise = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        level = int(rng.uniform(0.7, 0.85) * 255)
        blob = noise.point([0] * (level + 1) + [255] * (255 - level))
        colour = tuple(int(c) for c in _muted(rng))
        canvas = Image.composite(Image.blend(canvas, Image.new("RGB", canvas.size, colour), 0.7), canvas, blob)
    spread = int(rng.integers(3, 12))
    noisy = np.asarray(canvas, np.int16) + rng.integers(-spread, spread + 1, (size, size, 1), dtype=np.int16)
    canvas = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 7))):  # thin lines
        ends = (rng.random(4) * size).tolist()
        colour = tuple(int(c) for c in _hsv(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 0.95)))
        draw.line(ends, fill=colour, width=int(rng.integers(1, 3)) * max(1, size // 128))
    return np.array(canvas)


# ---------------------------------------------------------------------------------------
# Placement and the scene.
# ---------------------------------------------------------------------------------------
@dataclass
class _Object:
    """One placed object: the pixel window around it and its full (unoccluded) mask there."""

    window: tuple[slice, slice]
    local: np.ndarray

    def full(self, size: int) -> np.ndarray:
        mask = np.zeros((size, size), bool)
        mask[self.window] = self.local
        return mask


def _draw_shape(rng: np.random.Generator, name: str, axis: np.ndarray, extent: float) -> _Object:
    """One object at a random position, rotation and aspect jitter (tested in its window only)."""
    size = len(axis)
    half = extent / 2
    cx, cy = rng.uniform(half * 0.9, 1 - half * 0.9, size=2)
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.85, 1.15)
    reach = half * math.hypot(aspect, 1 / aspect) * 1.05  # every geometry lies in |u|, |v| <= 1
    x0, x1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 2)
    y0, y1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 2)
    dx, dy = axis[None, x0:x1] - np.float32(cx), axis[y0:y1, None] - np.float32(cy)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    u = (dx * c + dy * s) / np.float32(half * aspect)
    v = (dy * c - dx * s) / np.float32(half / aspect)
    return _Object((slice(y0, y1), slice(x0, x1)), GEOMETRY[name](u, v))


def _size_range(name: str, count: int) -> tuple[float, float]:
    """Extent range of a class: thin shapes start larger so they keep ``MIN_VISIBLE`` area."""
    low = max(SIZE_RANGE[0], math.sqrt(1.25 * MIN_VISIBLE / _unit_area(name)))
    high = max(low, min(SIZE_RANGE[1], 1.0 / math.sqrt(count)))
    return low, high


def _place(rng: np.random.Generator, names: list[str], axis: np.ndarray) -> list[_Object]:
    """Objects placed in order (later ones on top) so that every one stays mostly visible."""
    size = len(axis)
    placed: list[_Object] = []
    fulls: list[np.ndarray] = []
    for name in names:
        low, high = _size_range(name, len(names))
        best, best_cost = None, math.inf
        for attempt in range(PLACEMENT_TRIES):
            shrink = 0.85 ** (attempt // 8)  # crowded scenes: smaller objects after a while
            obj = _draw_shape(rng, name, axis, rng.uniform(low, high) * shrink)
            full = obj.full(size)
            cost = _occlusion_cost(fulls + [full])
            if cost < best_cost:
                best, best_cost = (obj, full), cost
            if cost == 0:
                break
        placed.append(best[0])
        fulls.append(best[1])
    return placed


def _visible(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Visible part of each mask when later masks are painted on top."""
    if not masks:
        return []
    out, covered = [], np.zeros_like(masks[0])
    for mask in reversed(masks):
        out.append(mask & ~covered)
        covered = covered | mask
    return out[::-1]


def _occlusion_cost(masks: list[np.ndarray]) -> float:
    """0 when every object keeps enough of itself visible; grows with the violation."""
    cost = 0.0
    for full, seen in zip(masks, _visible(masks), strict=True):
        area, kept = int(np.count_nonzero(full)), int(np.count_nonzero(seen))
        if area == 0:
            return math.inf
        cost += max(0.0, (1 - MAX_OCCLUDED) - kept / area) + max(0.0, MIN_VISIBLE - kept / full.size) * 10
    return cost


def render_scene(names: list[str], rng: np.random.Generator, size: int, hues: list[float] | None = None, style: str = "textured") -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 (size, size, 3) scene holding one object per name, and its (N, size, size)
    bool masks of visible pixels, in the order of ``names``. Each object takes its class's hue,
    or ``hues[i]`` when given (the trained world, where colour must not identify a class).
    ``style`` is one of ``SCENE_STYLES``."""
    if style not in SCENE_STYLES:
        raise UserError(f"unknown shapes style {style!r}", f"use one of {', '.join(SCENE_STYLES)}")
    textured = SCENE_STYLES[style]
    unknown = [n for n in names if n not in GEOMETRY]
    if unknown:
        raise UserError(f"unknown shape class(es) {', '.join(map(repr, unknown))}", f"choose from: {', '.join(SHAPE_NAMES)}")
    if size < MIN_SIZE_PX:
        raise UserError(f"shapes world size {size} px is too small", f"use at least {MIN_SIZE_PX} px")
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    img = _background(rng, size, clutter=textured)
    objects = _place(rng, list(names), axis)
    if hues is None:
        hues = [class_hue(n) for n in names]
    for hue, obj in zip(hues, objects, strict=True):
        ys, xs = obj.window
        colours = _paint_object(rng, hue, axis[None, xs], axis[ys, None], textured)
        region = img[obj.window]
        region[obj.local] = colours[obj.local].astype(np.uint8)
    masks = np.stack(_visible([o.full(size) for o in objects])) if objects else np.zeros((0, size, size), bool)
    return img, masks
