"""Shard sets carry a wids index: webdataset's random-access reader opens them as they are."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from iosd.featstore import decode_features, encode_features
from iosd.pipeline.writer import WIDS_INDEX_NAME, ShardSetWriter
from iosd.schema import EXT_EMB, EXT_FEAT, EXT_META, MANIFEST_NAME, Sample, encode_sample

wids = pytest.importorskip("wids")


def sample(shard: int, i: int) -> dict:
    s = Sample(key=f"{shard:06d}_{i:05d}", image=np.full((8, 8, 3), i, np.uint8), prompt=f"p{shard}-{i}", seed=i, classes=[],
               masks=np.zeros((0, 8, 8), np.uint8), embeddings=np.full((1, 4), shard * 100 + i, np.float32))
    feats = {"mid_block": np.full((2, 2, 2), shard * 100 + i, np.float32)}
    return encode_sample(s, encode_features(feats))


def test_wids_reads_sample_i_of_a_shard_set_through_its_index(tmp_path):
    out = tmp_path / "set"
    writer = ShardSetWriter(out, {"identity": {"seed": 0}, "features": {"layers": [], "dtype": "float16"}}, 2)
    writer.prepare()
    index = json.loads((out / WIDS_INDEX_NAME).read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1 and index["shardlist"] == []
    sizes = (3, 2)
    for shard, n in enumerate(sizes):
        writer.write_shard(shard, [sample(shard, i) for i in range(n)], {"written": n})
    manifest = writer.write_manifest()
    index = json.loads((out / WIDS_INDEX_NAME).read_text())
    assert [(e["url"], e["nsamples"], e["filesize"]) for e in index["shardlist"]] == [(s["name"], s["samples"], s["bytes"]) for s in manifest["shards"]]
    assert all("/" not in e["url"] for e in index["shardlist"])  # relative: the set can move

    dataset = wids.ShardListDataset(str(out / WIDS_INDEX_NAME), cache_dir=str(tmp_path / "cache"), transformations=[])
    assert len(dataset) == sum(sizes)
    for i, (shard, within) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        got = dataset[i]
        assert got["__key__"] == f"{shard:06d}_{within:05d}"
        meta = json.loads(got["." + EXT_META].read())
        assert meta["prompt"] == f"p{shard}-{within}"
        assert np.load(io.BytesIO(got["." + EXT_EMB].read()))[0, 0] == shard * 100 + within
        assert decode_features(got["." + EXT_FEAT].read())["mid_block"][0, 0, 0] == shard * 100 + within
    dataset.close()
    assert (out / MANIFEST_NAME).exists()


def test_overwrite_rewrites_the_index(tmp_path):
    out = tmp_path / "set"
    first = ShardSetWriter(out, {"identity": {"seed": 0}, "features": {"layers": [], "dtype": "float16"}}, 1)
    first.prepare()
    first.write_shard(0, [sample(0, 0)], {"written": 1})
    first.write_manifest()
    assert len(json.loads((out / WIDS_INDEX_NAME).read_text())["shardlist"]) == 1
    ShardSetWriter(out, {"identity": {"seed": 1}, "features": {"layers": [], "dtype": "float16"}}, 1, overwrite=True).prepare()
    assert json.loads((out / WIDS_INDEX_NAME).read_text())["shardlist"] == []
