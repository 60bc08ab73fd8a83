"""The built-in shapes world: deterministic scenes, exact visible masks, class-specific looks."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import rgb_to_hsv

from iosd.classes import load_split
from iosd.errors import UserError
from iosd.pipeline.shapes import GEOMETRY, MIN_VISIBLE, SHAPE_NAMES, class_hue, render_scene


def _scene(names, seed=0, size=128):
    return render_scene(list(names), np.random.default_rng(seed), size)


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def _mean_hue(image: np.ndarray, mask: np.ndarray) -> float:
    """Circular mean hue of the masked pixels."""
    hsv = rgb_to_hsv(image[mask].astype(np.float32) / 255)
    angle = hsv[:, 0] * 2 * np.pi
    return float(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)) % 1.0


def test_names_come_from_the_shapes_class_set():
    assert set(SHAPE_NAMES) == set(load_split("shapes", 1).all)
    assert len(SHAPE_NAMES) == 12 and set(GEOMETRY) == set(SHAPE_NAMES)


def test_same_rng_same_scene_and_other_seed_another():
    names = ["star", "ring", "arrow"]
    image_a, masks_a = _scene(names, seed=7)
    image_b, masks_b = _scene(names, seed=7)
    assert np.array_equal(image_a, image_b) and np.array_equal(masks_a, masks_b)
    image_c, masks_c = _scene(names, seed=8)
    assert not np.array_equal(image_a, image_c)
    assert not np.array_equal(masks_a, masks_c)


@pytest.mark.parametrize("size", [64, 128, 200])
def test_one_visible_mask_per_name_in_order(size):
    names = ["disc", "cross", "disc"]
    image, masks = _scene(names, seed=3, size=size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert masks.shape == (3, size, size) and masks.dtype == bool
    # visible masks never claim the same pixel
    assert masks.sum(axis=0).max() == 1
    # mask i holds the hue of name i (disc red, cross green): order is kept
    for name, mask in zip(names, masks, strict=True):
        assert _hue_distance(_mean_hue(image, mask), class_hue(name)) < 0.05


def test_every_object_stays_clearly_visible():
    rng = np.random.default_rng(0)
    for seed in range(60):
        names = list(rng.choice(SHAPE_NAMES, size=1 + seed % 3))
        _, masks = _scene(names, seed=seed)
        fractions = masks.mean(axis=(1, 2))
        assert fractions.min() >= MIN_VISIBLE, (seed, names, fractions)
        # no object fills the frame either (extent 50-80% of the side)
        assert fractions.max() < 0.5, (seed, names, fractions)


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_each_class_has_its_hue_whatever_the_texture(name):
    for seed in range(4):
        image, masks = _scene([name], seed=seed)
        assert _hue_distance(_mean_hue(image, masks[0]), class_hue(name)) < 0.05, seed


def test_objects_are_saturated_and_backgrounds_muted():
    image, masks = _scene(["square", "heart"], seed=11)
    saturation = rgb_to_hsv(image.astype(np.float32) / 255)[..., 1]
    inside = masks.any(axis=0)
    assert np.median(saturation[inside]) > 0.55
    assert np.median(saturation[~inside]) < 0.35


def test_class_geometries_differ():
    axis = (np.arange(96) + 0.5) / 48 - 1
    u, v = np.meshgrid(axis, axis)
    shapes = {name: inside(u, v) for name, inside in GEOMETRY.items()}
    for a in SHAPE_NAMES:
        assert shapes[a].mean() > 0.2, a
        for b in SHAPE_NAMES:
            if a < b:
                iou = (shapes[a] & shapes[b]).sum() / (shapes[a] | shapes[b]).sum()
                assert iou < 0.85, (a, b, iou)
    # the ring has a hole, the crescent a bite: not discs
    assert not shapes["ring"][48, 48] and shapes["disc"][48, 48]


def test_empty_scene_is_just_background():
    image, masks = _scene([], seed=1, size=64)
    assert image.shape == (64, 64, 3) and masks.shape == (0, 64, 64)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="unknown shape class.*'cat'"):
        _scene(["disc", "cat"])
    with pytest.raises(UserError, match="too small"):
        _scene(["disc"], size=8)
