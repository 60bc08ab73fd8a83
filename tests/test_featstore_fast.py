"""The lean feature reader and stored-dtype loader: same numbers as zarr, refusals, fp8 / int8 bounds."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from zarr.storage import MemoryStore

from iosd.errors import UserError
from iosd.featstore import (
    CODECS,
    E4M3_TABLE,
    FeatureLayoutError,
    all_finite,
    decode_features,
    dequantize,
    encode_features,
    open_feature_group,
    read_stored,
)
from iosd.layers import FEATURE_DTYPES, layer_key
from iosd.manifest import write_json_atomic
from iosd.schema import (
    EXT_FEAT,
    MANIFEST_NAME,
    ClassRecord,
    Sample,
    encode_sample,
    iter_tar_samples,
)
from iosd.train.cli import main as train_main
from iosd.train.data import (
    DecodeSpec,
    LayoutError,
    SampleError,
    collate,
    decode_item,
    dequantize_tensor,
    to_device_features,
)


def layers(seed: int = 0) -> dict[str, np.ndarray]:
    """Odd shapes, a heavy tail, an all-zero layer (zarr writes no chunk for it) and a
    channel of zeros (scale 1)."""
    rng = np.random.default_rng(seed)
    heavy = rng.standard_t(3, (6, 5, 7)).astype(np.float32) * 4
    heavy[2] = 0
    return {
        "mid_block": rng.standard_normal((8, 4, 4)).astype(np.float32) * 3,
        "up_blocks.0.attentions.2": heavy,
        "up_blocks.2.resnets.2": np.zeros((3, 8, 8), np.float32),
        "conv_in": (rng.standard_normal((4, 16, 16)) * 1e-3).astype(np.float32),  # tiny values: fp8 subnormals
    }


def layout(feats: dict[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    return [(p, a.shape) for p, a in feats.items()]


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_lean_reader_gives_zarrs_arrays_bit_for_bit(dtype, codec):
    feats = layers()
    data = encode_features(feats, dtype, codec)
    stored = read_stored(data, layout(feats), dtype)
    group = open_feature_group(data)
    assert stored.dtype == dtype
    for path in feats:
        raw = group[layer_key(path)][...]
        assert stored.arrays[path].dtype == raw.dtype and np.array_equal(stored.arrays[path], raw)
        if dtype in ("int8", "fp8"):
            assert np.array_equal(stored.scales[path], group[f"{layer_key(path)}__scale"][...])
    reference = decode_features(data)
    for path, values in stored.dequantized().items():
        assert values.dtype == np.float32 and np.array_equal(values, reference[path], equal_nan=True)
    # the device-side dequantisation (here on the CPU) gives the same float32
    for path in feats:
        x = torch.from_numpy(stored.arrays[path].copy())[None]
        if dtype == "bfloat16":
            x = x.view(torch.bfloat16)
        scale = torch.from_numpy(stored.scales[path].copy())[None] if path in stored.scales else None
        assert torch.equal(dequantize_tensor(x, dtype, scale)[0], torch.from_numpy(reference[path]))
    # uncompressed members are read in place, not copied
    if codec == "none":
        assert not stored.arrays["mid_block"].flags.owndata


def test_the_format_stays_a_zarr_group_readable_by_zarr_alone():
    feats = layers()
    data = encode_features(feats, "fp8", "blosc-zstd")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        store = MemoryStore({n: zarr.core.buffer.cpu.Buffer.from_bytes(zf.read(n)) for n in zf.namelist()}, read_only=True)
    group = zarr.open_group(store, mode="r")
    assert group.attrs["iosd_features"]["dtype"] == "fp8"
    key = layer_key("mid_block")
    values = E4M3_TABLE[group[key][...]] * group[f"{key}__scale"][...][:, None, None]  # as the module docstring says
    assert np.array_equal(values, decode_features(data)["mid_block"])


def zarr_written(feats: dict[str, np.ndarray], dtype: str, codec: str) -> bytes:
    """The group as zarr itself writes it (create_group, create_array, arr[...] = q), zipped
    as encode_features zips its entries."""
    from iosd.featstore import SCALE_SUFFIX, _quantize

    attrs = {"iosd_features": {"dtype": dtype, "codec": codec, "layers": {p: layer_key(p) for p in feats}}}
    store = MemoryStore()
    group = zarr.create_group(store=store, attributes=attrs)
    for path, x in feats.items():
        q, scale = _quantize(x, dtype)
        group.create_array(layer_key(path), shape=q.shape, dtype=q.dtype, chunks=q.shape, compressors=CODECS[codec]())[...] = q
        if scale is not None:
            group.create_array(f"{layer_key(path)}{SCALE_SUFFIX}", shape=scale.shape, dtype=scale.dtype, chunks=scale.shape, compressors=[])[...] = scale
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(store._store_dict):
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), store._store_dict[name].to_bytes())
    return buf.getvalue()


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("codec", list(CODECS))
def test_the_encoder_writes_zarrs_own_bytes(dtype, codec):
    """The lean encoder skips zarr's machinery, not its format: byte for byte what zarr
    writes, the all-zero layer (no chunk), -0.0 and a late non-zero value included."""
    feats = layers()
    feats["down_blocks.1.attentions.0"] = np.array([[[-0.0, 0.0], [0.0, -0.0]]], np.float32)
    late = np.zeros((2, 64, 64), np.float32)
    late[1, 63, 63] = 2.5
    feats["down_blocks.1.resnets.1"] = late
    assert encode_features(feats, dtype, codec) == zarr_written(feats, dtype, codec)
    half = {p: x.astype(np.float16) for p, x in feats.items()}  # as iosd-gen hands float16 over
    assert encode_features(half, dtype, codec) == zarr_written(half, dtype, codec)


def test_e4m3_table_is_torchs_float8():
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = bits.view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(E4M3_TABLE, expected, equal_nan=True)


def test_round_trip_error_bounds_of_int8_and_fp8():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal((4, 32, 32)), rng.standard_t(2, (4, 32, 32)) * 10, rng.standard_normal((4, 32, 32)) * 1e-4]).astype(np.float32)
    amax = np.abs(x.reshape(len(x), -1)).max(axis=1)[:, None, None]
    data = {dtype: decode_features(encode_features({"l": x}, dtype, "none"))["l"] for dtype in ("int8", "fp8", "float16")}
    err8 = np.abs(data["int8"] - x)
    assert (err8 <= amax / 254 * (1 + 1e-5)).all()  # half a step of 127 per channel
    # e4m3: 3 mantissa bits (relative error <= 2^-4) down to the subnormals (step 2^-9 of the scale)
    scale = amax / 448
    errf = np.abs(data["fp8"] - x)
    assert (errf <= np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-5)).all()
    # and the channel maximum survives exactly (it maps to 448)
    assert np.allclose(np.abs(data["fp8"]).reshape(len(x), -1).max(axis=1), amax.ravel(), rtol=1e-6)
    # fp8's error stays below 6.5% of each value, int8's below 0.4% of the channel's maximum
    rel = np.abs(data["fp8"] - x) / np.maximum(np.abs(x), 1e-30)
    assert rel[np.abs(x) >= scale * 2.0**-6].max() <= 2.0**-4 + 1e-6


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_a_batch_quantised_on_the_device_encodes_to_the_same_bytes_per_sample(dtype):
    """iosd-gen quantises a batch where the UNet ran (float16 there) and encodes each sample's
    stored arrays: each sample keeps its own per-channel scales (never the batch's), and the
    bytes equal encoding that sample's float32 values directly."""
    from iosd.featstore import STORED_DTYPES, StoredFeatures
    from iosd.quantize import quantize_tensor

    samples = [layers(seed) for seed in range(3)]
    samples[1] = {p: a * 1000 for p, a in samples[1].items()}  # another scale per sample
    for a in samples[2].values():
        a.reshape(-1)[:1] = -0.0
    for device_dtype in (torch.float32, torch.float16):
        batch = {p: torch.stack([torch.from_numpy(s[p]) for s in samples]).to(device_dtype) for p in samples[0]}
        stored = {p: quantize_tensor(t, dtype) for p, t in batch.items()}
        for b, sample in enumerate(samples):
            arrays = {p: q[b].numpy().view(STORED_DTYPES[dtype]) for p, (q, _) in stored.items()}
            scales = {p: s[b].numpy() for p, (_, s) in stored.items() if s is not None}
            direct = {p: batch[p][b].float().numpy() for p in sample}  # the values the device held
            assert encode_features(StoredFeatures(dtype, arrays, scales)) == encode_features(direct, dtype)


def test_int8_and_fp8_follow_the_documented_rule():
    """An independent NumPy statement of the rule (scale = amax / top per channel, 1 for an
    all-zero channel; int8 rounds half to even and clips to +-127; fp8 = e4m3fn of x / scale)."""
    x = layers(5)["up_blocks.0.attentions.2"]
    amax = np.abs(x).reshape(len(x), -1).max(axis=1)
    for dtype, top in (("int8", 127.0), ("fp8", 448.0)):
        scale = np.where(amax == 0, 1.0, amax / np.float32(top)).astype(np.float32)
        group = open_feature_group(encode_features({"l": x}, dtype))
        assert np.array_equal(group[f"{layer_key('l')}__scale"][...], scale)
        q = group[layer_key("l")][...]
        y = x / scale[:, None, None]
        if dtype == "int8":
            assert np.array_equal(q, np.clip(np.rint(y), -127, 127).astype(np.int8))
        else:  # e4m3 rounds to a nearest representable value, with y's sign
            finite = E4M3_TABLE[:127]  # 0 ... 448, the non-negative finite values
            best = np.abs(finite[None, :] - np.abs(y).reshape(-1, 1)).min(axis=1).reshape(y.shape)
            assert np.array_equal(np.abs(E4M3_TABLE[q] - y), best)
            assert (np.sign(E4M3_TABLE[q]) * np.sign(y) >= 0).all()


def test_fp8_without_torch_float8_is_one_clear_error(monkeypatch):
    # imported while float8 is present (diffusers needs it)
    from iosd.pipeline.generate import GenConfig

    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(UserError, match="fp8 needs float8 support") as err:
        encode_features(layers(), "fp8")
    assert "--feature-dtype int8" in err.value.fix
    # iosd-gen says so before it loads a model (fp8 is every recipe's default)
    with pytest.raises(UserError, match="fp8 needs float8 support"):
        GenConfig(classes="shapes", source="shapes", model="tiny").resolved()
    GenConfig(classes="shapes", source="shapes", model="tiny", feature_dtype="int8").resolved()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "fp8"])
def test_finite_check_on_stored_bits_matches_isfinite(dtype):
    if dtype == "fp8":
        bits = np.arange(256, dtype=np.uint8)
        values = E4M3_TABLE[bits]
    else:
        bits = np.arange(65536, dtype=np.uint16)
        values = bits.view(np.float16) if dtype == "float16" else dequantize(bits, "bfloat16")
    for b, v in zip(bits, values, strict=True):
        stored = np.full(3, b, bits.dtype)
        if dtype == "float16":
            stored = stored.view(np.float16)
        assert all_finite(stored, dtype) == bool(np.isfinite(v)), (dtype, hex(int(b)))
    assert all_finite(np.zeros(3 << 17, np.float16), "float16")
    big = np.zeros(3 << 17, np.float16)
    big[-1] = np.inf  # in the last block
    assert not all_finite(big, "float16")
    assert all_finite(np.full(4, -128, np.int8), "int8")


def test_non_finite_values_are_caught_for_every_dtype():
    for dtype in FEATURE_DTYPES:
        feats = layers()
        feats["mid_block"][1, 2, 3] = np.nan
        stored = read_stored(encode_features(feats, dtype), layout(feats), dtype)
        bad = not all_finite(stored.arrays["mid_block"], dtype) or not np.isfinite(stored.scales.get("mid_block", 0)).all()
        assert bad, dtype


def test_anything_but_the_trusted_layout_is_refused():
    feats = layers()
    data = encode_features(feats, "float16")
    with pytest.raises(FeatureLayoutError, match="stored float16, the manifest says int8"):
        read_stored(data, layout(feats), "int8")
    with pytest.raises(FeatureLayoutError, match=r"layer mid_block is \[8, 4, 4\], the layout says \[8, 4, 5\]"):
        read_stored(data, [("mid_block", (8, 4, 5))], "float16")
    with pytest.raises(FeatureLayoutError, match="no feature layer down_blocks.0"):
        read_stored(data, [("down_blocks.0", (8, 4, 4))], "float16")
    # an array zarr can read but this reader does not take: chunked, or another codec
    for options in ({"chunks": (4, 4, 4)}, {"compressors": [zarr.codecs.GzipCodec()]}):
        store = MemoryStore()
        group = zarr.create_group(store=store, attributes={"iosd_features": {"dtype": "float16", "codec": "x", "layers": {"mid_block": "mid_block"}}})
        arr = group.create_array("mid_block", shape=(8, 4, 4), dtype="float16", **{"chunks": (8, 4, 4), "compressors": [], **options})
        arr[...] = feats["mid_block"].astype(np.float16)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, value in store._store_dict.items():
                zf.writestr(name, value.to_bytes())
        with pytest.raises(FeatureLayoutError, match="chunk|codecs"):
            read_stored(buf.getvalue(), [("mid_block", (8, 4, 4))], "float16")
    # damaged bytes are not a layout problem: the loader counts them as a corrupt sample
    with pytest.raises(zipfile.BadZipFile):
        read_stored(data[: len(data) // 2], layout(feats), "float16")


# -- the loader ------------------------------------------------------------------------------

def raw_sample(feats: dict[str, np.ndarray], dtype: str, codec: str = "none", key: str = "000000_00000") -> dict:
    sample = Sample(
        key=key, image=np.zeros((16, 16, 3), np.uint8), prompt="a photo of a cat", seed=0,
        classes=[ClassRecord("cat", "seen", 1.0, 10, "kept", 0), ClassRecord("dog", "unseen", 1.0, 5, "kept", 1)],
        masks=np.stack([np.eye(16, dtype=np.uint8), np.ones((16, 16), np.uint8)]),
        embeddings=np.arange(8, dtype=np.float32).reshape(2, 4),
    )
    members = encode_sample(sample, encode_features(feats, dtype, codec))
    return {k: (v.encode() if isinstance(v, str) and k != "__key__" else v) for k, v in members.items()}


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_loader_keeps_the_stored_dtype_and_the_device_gets_zarrs_values(dtype):
    feats = layers()
    spec = DecodeSpec(tuple(layout(feats)), 4, subsets=None, mask_size=16, dtype=dtype)
    raw = raw_sample(feats, dtype)
    raw["png"] = b"not a png: training never decodes it"
    items = [decode_item(raw, spec), decode_item(raw_sample(layers(1), dtype, "blosc-lz4"), spec)]
    stored_np = {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8, "fp8": np.uint8}[dtype]
    assert all(a.dtype == stored_np for a in items[0]["features"].values())
    batch = collate(items)
    stored_torch = {"float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8, "fp8": torch.uint8}[dtype]
    assert batch["feature_dtype"] == dtype and all(t.dtype == stored_torch for t in batch["features"].values())
    assert batch["targets"].dtype == torch.uint8 and batch["targets"].shape == (2, 2, 16, 16)
    values = to_device_features(batch, "cpu")
    for b, seed in enumerate((0, 1)):
        reference = decode_features(encode_features(layers(seed), dtype))
        for path in feats:
            assert values[path].dtype == torch.float32 and torch.equal(values[path][b], torch.from_numpy(reference[path]))


def test_loader_refuses_a_sample_of_another_dtype_or_shape_and_names_nan():
    feats = layers()
    spec = DecodeSpec(tuple(layout(feats)), 4, subsets=None, dtype="float16")
    with pytest.raises(LayoutError, match="000000_00000: features are stored int8, the manifest says float16"):
        decode_item(raw_sample(feats, "int8"), spec)
    with pytest.raises(LayoutError, match="layer mid_block is"):
        decode_item(raw_sample(feats, "float16"), DecodeSpec((("mid_block", (8, 4, 2)),), 4, subsets=None, dtype="float16"))
    feats["conv_in"][0, 0, 0] = np.inf
    with pytest.raises(SampleError, match="layer conv_in holds NaN or infinite values"):
        decode_item(raw_sample(feats, "float16"), spec)
    broken = raw_sample(layers(), "float16")
    broken[EXT_FEAT] = broken[EXT_FEAT][:-100]
    with pytest.raises(SampleError, match="cannot be decoded"):
        decode_item(broken, spec)


def test_worker_batches_come_back_in_shared_memory_in_the_stored_dtype():
    from torch.utils.data import DataLoader, IterableDataset

    feats = layers()
    spec = DecodeSpec(tuple(layout(feats)), 4, subsets=None, dtype="float16")
    raws = [raw_sample(feats, "float16") for _ in range(2)]

    class Batches(IterableDataset):
        def __iter__(self):
            yield collate([decode_item(r, spec) for r in raws])

    (batch,) = list(DataLoader(Batches(), batch_size=None, num_workers=1))
    assert all(t.dtype == torch.float16 and t.is_shared() for t in batch["features"].values())


# -- end to end through iosd-train -----------------------------------------------------------

QUICK = ["--batch-size", "4", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=64", "--head-option", "ffn=128"]


def restore(src, dst, dtype: str | None = None, codec: str = "none", manifest_dtype: str | None = None):
    """A copy of a shard set with its features re-stored as ``dtype`` (manifest updated)."""
    shutil.copytree(src, dst)
    if dtype is not None:
        for tar_path in dst.glob("*.tar"):
            with tarfile.open(tar_path) as tar:
                members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
            with tarfile.open(tar_path, "w") as tar:
                for info, data in members:
                    if info.name.endswith("." + EXT_FEAT):
                        data = encode_features(decode_features(data), dtype, codec)
                        info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["features"]["dtype"] = manifest_dtype or dtype or manifest["features"]["dtype"]
    write_json_atomic(dst / MANIFEST_NAME, manifest)
    return dst


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_trains_and_validates_on_quantised_shards(shapes_set, tmp_path, dtype):
    shards = restore(shapes_set, tmp_path / dtype, dtype)
    args = [str(shards), "--steps", "2", "--val", str(shards), "--val-every", "2", "--out", str(tmp_path / "run"), *QUICK]
    result = CliRunner().invoke(train_main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["val_miou"] is not None


def test_a_shard_whose_features_differ_from_the_manifest_stops_training_naming_it(shapes_set, tmp_path):
    shards = restore(shapes_set, tmp_path / "mixed", "int8", manifest_dtype="float16")
    result = CliRunner().invoke(train_main, [str(shards), "--steps", "2", "--out", str(tmp_path / "run"), *QUICK])
    assert result.exit_code == 2, result.output
    assert ".tar" in result.output and "stored int8, the manifest says float16" in result.output
    assert "Traceback" not in result.output


def test_the_pool_gives_each_batch_part_its_own_buffer_back():
    """A batch takes two buffers (features, small parts); released in order, each comes back
    for the same part: a pool that handed the features' slot to the small parts would
    allocate fresh shared memory for nearly every batch (a page fault per 4 KiB)."""
    from iosd.train.data import BufferPool

    board = torch.zeros(8, dtype=torch.int8)
    pool = BufferPool(board)
    big, small = (("features", (4, 64), "<f2"),), (("queries", (4, 2, 8), "<f4"),)
    storages, in_use = set(), []
    for _ in range(20):
        parts = [pool.storage(big, 512)]
        if len(in_use) > 1:  # the main process lets a batch go while the worker fills the next
            for slot in in_use.pop(0):
                board[slot] = 0
        parts.append(pool.storage(small, 256))
        storages.update(s.data_ptr() for s, _ in parts)
        in_use.append([slot for _, (_, slot) in parts])
    assert len(storages) <= 2 * 3


def features_by_key(shard_dir) -> dict[str, dict[str, np.ndarray]]:
    """Every sample's features as zarr reads them, by sample key: what batches must hold."""
    reference = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if info.name.endswith("." + EXT_FEAT):
                    reference[info.name.split(".")[0]] = decode_features(tar.extractfile(info).read())
    return reference


def test_every_feature_batch_lives_in_the_arena_of_workers_plus_one_slots(shapes_set):
    """The loader's memory bound by construction: with one batch in flight per worker and
    the batch in use let go before the next is fetched, workers + 1 arena slots always
    suffice (no batch falls back to memory of its own) and they hold the right values."""
    from iosd.train.data import TrainLoader, TrainStream
    from iosd.train.shards import resolve_shards

    shard_set = resolve_shards(str(shapes_set))
    reference = features_by_key(shapes_set)
    embeddings = {s.key: s.embeddings for path in sorted(shapes_set.glob("shard-*.tar")) for s in iter_tar_samples(str(path))}
    spec = DecodeSpec.for_shards(shard_set, subsets=None, mask_size=16)
    for workers in (0, 2):
        loader = TrainLoader(TrainStream(shard_set, spec, 2), workers)
        try:
            assert loader.arena.slots == workers + 1
            for _ in range(12):
                batch = loader.next(lambda message: None)
                assert loader.slot is not None, "a batch fell back to a buffer outside the arena"
                assert loader.in_use == [], "the batch's small parts came outside its arena slot"
                for b, key in enumerate(batch["keys"]):  # small parts from the slot's tail: right values
                    q = len(batch["names"][b])
                    assert torch.equal(batch["queries"][b, :q], torch.from_numpy(embeddings[key])) and batch["query_mask"][b].sum() == q
                    assert not batch["query_mask"][b, q:].any() and not batch["queries"][b, q:].any()
                values = to_device_features(batch, "cpu")
                for b, key in enumerate(batch["keys"]):
                    for path, x in values.items():
                        assert torch.equal(x[b], torch.from_numpy(reference[key][path])), (key, path)
            assert int(loader.arena.board.sum()) <= workers + 1
        finally:
            loader.close()


def test_pooled_worker_buffers_are_never_overwritten_while_a_batch_is_in_use(shapes_set):
    """Workers fill their shared buffers again once the main process moved on: every batch,
    taken while later ones are being decoded, still holds its own samples' values."""
    from iosd.train.data import TrainLoader, TrainStream
    from iosd.train.shards import resolve_shards

    shard_set = resolve_shards(str(shapes_set))
    reference = features_by_key(shapes_set)
    spec = DecodeSpec.for_shards(shard_set, subsets=None, mask_size=16)
    loader = TrainLoader(TrainStream(shard_set, spec, 2), 2, prefetch=2)
    try:
        for _ in range(30):  # several times round each worker's pool
            batch = loader.next(lambda message: None)
            values = to_device_features(batch, "cpu")
            for b, key in enumerate(batch["keys"]):
                for path, x in values.items():
                    assert torch.equal(x[b], torch.from_numpy(reference[key][path])), (key, path)
    finally:
        loader.close()
    assert loader.board.is_shared() and int(loader.board.sum()) <= 2 * (2 + 3) * 2


@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
def test_the_lean_member_table_is_zipfiles(dtype):
    """The loader reads a feature member's zip directory in place; it agrees with zipfile entry
    for entry, and any zip it does not read itself (a comment, zip64) goes to zipfile."""
    from iosd.featstore import _central_directory, _Members

    data = encode_features(layers(), dtype, "blosc-zstd" if dtype == "int8" else "none")
    lean = _central_directory(memoryview(data))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert lean is not None and list(lean) == zf.namelist()
        for name, entry in lean.items():
            info = zf.getinfo(name)
            assert tuple(entry) == (info.header_offset, info.compress_size, info.compress_type, info.flag_bits)
    others = []
    for options in ({"comment": b"x"}, {"force_zip64": True}):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.comment = options.get("comment", b"")
            with zf.open("a", "w", force_zip64=options.get("force_zip64", False)) as f:
                f.write(b"123")
        others.append(buf.getvalue())
    assert _central_directory(memoryview(others[0])) is None
    for other in others:  # whatever the lean table declines, zipfile still reads
        assert bytes(_Members(other).get("a")) == b"123"
