"""The one-place contracts: class splits, layer presets, feature store, sample schema."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iosd.classes import canonical, check_names, load_split
from iosd.errors import UserError
from iosd.featstore import decode_features, encode_features
from iosd.layers import PRESETS, group_by_resolution, resolve_layers
from iosd.schema import KEPT, LOW_SCORE, ClassRecord, Sample, decode_sample, encode_sample


def test_pascal_and_coco_splits_match_the_papers():
    for split in (1, 2, 3):
        voc = load_split("pascal", split)
        assert (len(voc.seen), len(voc.unseen)) == (15, 5)
        coco = load_split("coco", split)
        assert (len(coco.seen), len(coco.unseen)) == (64, 14)
        assert "mouse" not in coco.all and "couch" not in coco.all
    assert load_split("pascal", 2).unseen == ("horse", "motorbike", "person", "pottedplant", "sheep")
    assert "hair drier" in load_split("coco", 1).unseen
    assert load_split("coco", 3).all.count("bench") == 1 and "bench" in load_split("coco", 3).unseen
    # every COCO class is unseen in at most one split
    unseen = [c for s in (1, 2, 3) for c in load_split("coco", s).unseen]
    assert len(unseen) == len(set(unseen)) == 42


def test_synonyms_map_voc_to_coco_labels():
    assert canonical("aeroplane") == "airplane"
    assert canonical("sofa") == "couch"
    assert canonical("tvmonitor") == "tv"
    assert canonical("dog") == "dog"


def test_user_class_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"seen": ["cat", "dog"], "unseen": ["unicorn"]}))
    split = load_split(str(path), 1)
    assert split.seen == ("cat", "dog") and split.unseen == ("unicorn",)
    path.write_text(json.dumps({"seen": ["cat"], "unseen": ["cat"]}))
    with pytest.raises(UserError, match="both seen and unseen"):
        load_split(str(path), 1)
    with pytest.raises(UserError, match="unknown class set"):
        load_split("imagenet", 1)
    with pytest.raises(UserError, match="outside 1..3"):
        load_split("coco", 4)
    with pytest.raises(UserError, match="unknown class name"):
        check_names(["unicorn"], load_split("coco", 1))


def test_presets_exist_in_the_tiny_unet_of_their_family(tiny_loaded):
    from iosd.pipeline.tiny import tiny_sd1_unet

    names = {"sdxl": dict(tiny_loaded.pipe.unet.named_modules()), "sd": dict(tiny_sd1_unet(0).named_modules())}
    for preset, p in PRESETS.items():
        missing = [path for path in p.layers if path not in names[p.family]]
        assert not missing, (preset, missing)
    with pytest.raises(UserError):
        resolve_layers("nonsense")
    assert resolve_layers("mid_block,up_blocks.0") == ("mid_block", "up_blocks.0")


def test_preset_and_recipe_costs_at_512px_on_the_real_unet_layouts():
    """The bytes-per-sample tables of docs/recipes.md, measured on the real UNets built on the meta device."""
    from iosd.pipeline.capture import preset_shapes, recipe_shapes

    def megabytes(shapes):
        return sum(int(np.prod(s)) * 2 for s in shapes.values()) / 1e6

    expected_mb = {"iosd": 33.10, "gd": 34.08, "compact": 4.59, "decoder": 14.42, "blocks": 12.78}
    for preset in PRESETS:
        shapes = preset_shapes(preset)
        assert megabytes(shapes) == pytest.approx(expected_mb[preset], abs=0.01), (preset, shapes)
        if preset == "compact":
            assert [len(g) for g in group_by_resolution(shapes)] == [1, 1, 1]
    recipes = {"iosd": 33.10, "gd": 68.16, "fast": 4.59}  # gd stores both guidance halves
    assert {r: round(megabytes(recipe_shapes(r)), 2) for r in recipes} == recipes
    gd = recipe_shapes("gd")
    assert [(gd[g[0]][-1], sum(gd[p][0] for p in g)) for g in group_by_resolution(gd)] == [(8, 15360), (16, 14080), (32, 8320), (64, 5120)]


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 1e-2), ("int8", 2e-2)])
def test_feature_store_round_trip(dtype, tol):
    rng = np.random.default_rng(0)
    layers = {"up_blocks.0.attentions.2": rng.normal(size=(8, 4, 4)).astype(np.float32), "mid_block": rng.normal(size=(3, 2, 2)).astype(np.float32)}
    data = encode_features(layers, dtype)
    back = decode_features(data)
    for path, x in layers.items():
        assert back[path].dtype == np.float32 and back[path].shape == x.shape
        np.testing.assert_allclose(back[path], x, atol=tol * np.abs(x).max() * 4)
    assert decode_features(data, ["mid_block"]).keys() == {"mid_block"}
    assert encode_features(layers, dtype) == data  # byte-identical: shards can be hashed


def test_sample_schema_round_trip():
    rng = np.random.default_rng(1)
    records = [ClassRecord("cat", "seen", 0.9, 10, KEPT, 0), ClassRecord("dog", "unseen", 0.2, 5, LOW_SCORE, None)]
    sample = Sample("000001_00003", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), "a cat and a dog", 7, records, rng.integers(0, 2, (1, 16, 16)).astype(np.uint8), rng.normal(size=(2, 8)).astype(np.float32), extra={"shard": 1})
    members = encode_sample(sample, encode_features({"mid_block": np.ones((2, 2, 2), np.float32)}))
    assert all("." not in members["__key__"] for _ in [0])
    back = decode_sample({k: v for k, v in members.items() if k != "__key__"})
    assert back.key == sample.key and back.prompt == sample.prompt and back.classes == records
    np.testing.assert_array_equal(back.image, sample.image)
    np.testing.assert_array_equal(back.masks, sample.masks)
    assert [i for i, _ in back.targets()] == [0]
    assert back.targets(min_score=0.95) == []
    assert back.extra == {"shard": 1}
