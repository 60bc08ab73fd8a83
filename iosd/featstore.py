"""Per-sample UNet features as one ``feat.zarr.zip`` member: a zarr v3 group, one array per layer.

Arrays are stored as (the group attribute ``iosd_features.dtype`` says which):

- ``float16``;
- ``bfloat16`` as its uint16 bits (the high half of the float32, rounded to nearest even);
- ``int8`` with a float32 per-channel scale array ``<key>__scale`` (value = q * scale,
  scale = amax / 127);
- ``fp8``: float8 e4m3 ("e4m3fn": no infinities, NaN = 0x7F / 0xFF, largest 448) as its uint8
  bits, with a float32 per-channel scale array ``<key>__scale`` (scale = amax / 448).

Chunks are stored as they are (``none``, the default) or through a numcodecs Blosc codec;
``bench/codecs.py`` and ``bench/loader.py`` measured the choice (see ``DEFAULT_CODEC``).
Readers need nothing but ``zipfile`` and ``zarr``: ``decode_features`` is that reader.

The training loader reads the same bytes by a lean path, ``read_stored``: ``zipfile`` for the
member table, ``np.frombuffer`` on the zip's stored bytes (no copy) or numcodecs' blosc
for compressed chunks, trusting the layout the manifest states (array keys, shapes, stored
dtype) and refusing, with ``FeatureLayoutError``, anything else. It keeps the stored dtype;
``dequantize`` (NumPy) and the loader's device-side dequantisation give the same float32.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from iosd.choices import DEFAULT_CODEC
from iosd.errors import UserError
from iosd.layers import layer_key

# name -> zarr v3 codec list; every entry is numcodecs underneath. The names are also
# iosd.choices.CODEC_NAMES (iosd-gen's --codec), which holds the default's reasons.
CODECS = {
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "none": lambda: [],
}

# feature dtype -> the NumPy dtype of the stored array (little-endian, as zarr writes it)
STORED_DTYPES = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "int8": np.dtype("i1"), "fp8": np.dtype("u1")}
SCALED = ("int8", "fp8")  # dtypes with a per-channel float32 ``<key>__scale`` array
SCALE_SUFFIX = "__scale"


class FeatureLayoutError(ValueError):
    """A ``feat.zarr.zip`` whose arrays differ from the layout it was trusted to have."""


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8 e4m3fn bit patterns."""
    bits = np.arange(256)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    value = np.where(bits & 0x80, -value, value)
    value[(bits & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_TABLE = _e4m3_table()


def _per_channel(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape(-1, *([1] * (ndim - 1)))


def _quantize(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Cast one (C, H, W) float array to its stored form (and the per-channel scales) by
    ``iosd.quantize``, the rule iosd-gen also runs on the device."""
    if dtype == "float16":
        return x.astype(np.float16, copy=False), None  # iosd-gen hands float16 over as float16
    import torch

    from iosd.quantize import quantize_tensor

    x = x if x.flags.writeable else x.copy()  # torch.from_numpy warns on read-only arrays
    q, scale = quantize_tensor(torch.from_numpy(np.ascontiguousarray(x))[None], dtype)
    q = q[0].numpy().view(STORED_DTYPES[dtype])
    return q, (scale[0].numpy() if scale is not None else None)


def dequantize(stored: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """float32 values of one stored array (the loader's device-side dequantisation matches it)."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return stored.astype(np.float32) * _per_channel(scale, stored.ndim)
    if dtype == "fp8":
        return E4M3_TABLE[stored] * _per_channel(scale, stored.ndim)
    return stored.astype(np.float32)



def encode_features(layers: dict[str, np.ndarray] | StoredFeatures, dtype: str = "float16", codec: str = DEFAULT_CODEC) -> bytes:
    """Zip bytes of a zarr v3 group holding each layer (path -> (C, H, W) array), or of
    features already in their stored form (``StoredFeatures``: quantised on the device).

    The bytes are zarr's own: every ``zarr.json`` document is the one zarr writes for that
    array (made by zarr once per shape, dtype and codec, then reused), each chunk the array's
    little-endian bytes through the blosc codec zarr configures; only zarr's per-array
    machinery (an event loop and three copies of every chunk) is skipped. Tests hold it
    byte-identical to writing the group with zarr."""
    if codec not in CODECS:
        raise UserError(f"unknown feature codec {codec!r}", f"use one of {', '.join(CODECS)}")
    if isinstance(layers, StoredFeatures):
        dtype, stored = layers.dtype, layers
    else:
        stored = StoredFeatures(dtype, {}, {})
        for path, x in layers.items():
            stored.arrays[path], scale = _quantize(np.asarray(x), dtype)
            if scale is not None:
                stored.scales[path] = scale
    attrs = {"iosd_features": {"dtype": dtype, "codec": codec, "layers": {p: layer_key(p) for p in stored.arrays}}}
    entries = {"zarr.json": _group_document(json.dumps(attrs))}  # key order kept, as zarr keeps it
    for path, q in stored.arrays.items():
        scale = stored.scales.get(path)
        key = layer_key(path)
        _add_array(entries, key, q, codec)
        if scale is not None:
            _add_array(entries, f"{key}{SCALE_SUFFIX}", scale, "none")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # byte-identical reruns
            zf.writestr(info, entries[name])
    return buf.getvalue()


@functools.lru_cache(maxsize=64)
def _group_document(attrs_json: str) -> bytes:
    """The group's zarr.json, as zarr writes it for these attributes."""
    store = MemoryStore()
    zarr.create_group(store=store, attributes=json.loads(attrs_json))
    return store._store_dict["zarr.json"].to_bytes()


@functools.lru_cache(maxsize=1024)
def _array_template(shape: tuple[int, ...], dtype: str, codec: str) -> tuple[bytes, object | None]:
    """(zarr.json bytes, the numcodecs Blosc zarr configures, or None) of a one-chunk array,
    read off an empty array that zarr itself creates."""
    store = MemoryStore()
    arr = zarr.create_array(store=store, shape=shape, dtype=np.dtype(dtype), chunks=shape, compressors=CODECS[codec]())
    blosc = None
    for c in arr.metadata.codecs:
        if isinstance(c, BloscCodec):
            blosc = c._blosc_codec  # zarr's own numcodecs Blosc, typesize and shuffle as it evolves them
    return store._store_dict["zarr.json"].to_bytes(), blosc


def _add_array(entries: dict[str, bytes], key: str, q: np.ndarray, codec: str) -> None:
    document, blosc = _array_template(tuple(q.shape), q.dtype.str, codec)
    entries[f"{key}/zarr.json"] = document
    q = np.ascontiguousarray(q, dtype=q.dtype.newbyteorder("<"))
    if not q.reshape(-1).view(np.uint8).any():  # zarr writes no chunk that is all fill value:
        return  # for 0 it compares bit patterns, so -0.0 is written
    chunk_name = f"{key}/c/" + "/".join("0" * q.ndim) if q.ndim else f"{key}/c"
    entries[chunk_name] = blosc.encode(q) if blosc is not None else q.reshape(-1).view(np.uint8).data


def open_feature_group(data: bytes) -> zarr.Group:
    """The zarr group inside ``feat.zarr.zip`` bytes, read from memory."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        entries = {n: cpu.Buffer.from_bytes(zf.read(n)) for n in zf.namelist()}
    return zarr.open_group(MemoryStore(entries, read_only=True), mode="r")


def decode_features(data: bytes, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Layer path -> float32 (C, H, W) array, dequantised; ``layers`` selects a subset.

    The reference reader (zarr itself); the loader's ``read_stored`` must agree with it."""
    group = open_feature_group(data)
    meta = group.attrs["iosd_features"]
    wanted = layers if layers is not None else list(meta["layers"])
    out = {}
    for path in wanted:
        key = meta["layers"][path]
        scale = group[f"{key}{SCALE_SUFFIX}"][...] if meta["dtype"] in SCALED else None
        out[path] = dequantize(group[key][...], meta["dtype"], scale)
    return out


# -- the lean reader ---------------------------------------------------------------------------

@dataclass
class StoredFeatures:
    """Features as stored: arrays in the stored dtype (read-only views of the member's bytes
    where uncompressed) and, for int8 and fp8, float32 per-channel scales."""

    dtype: str
    arrays: dict[str, np.ndarray]
    scales: dict[str, np.ndarray] = field(default_factory=dict)

    def dequantized(self) -> dict[str, np.ndarray]:
        return {p: dequantize(a, self.dtype, self.scales.get(p)) for p, a in self.arrays.items()}


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_BLOSC_HEADER = struct.Struct("<4xIII")  # version, versionlz, flags, typesize; nbytes, blocksize, cbytes


@dataclass(frozen=True)
class _ArrayMeta:
    shape: tuple[int, ...]
    data_type: str
    compressed: bool
    fill_value: float


# zarr.json bytes -> parsed metadata (or the reason it is refused); every sample of a shard
# set repeats the same few documents, so each is parsed and checked once per process.
_META_CACHE: dict[tuple[str, bytes], object] = {}


def _cached(raw: bytes, parse):
    key = (parse.__name__, raw)
    hit = _META_CACHE.get(key)
    if hit is None:
        try:
            hit = parse(raw)
        except FeatureLayoutError as err:
            hit = err
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            hit = FeatureLayoutError(f"unreadable zarr metadata ({type(err).__name__}: {err})")
        if len(_META_CACHE) > 4096:
            _META_CACHE.clear()
        _META_CACHE[key] = hit
    if isinstance(hit, FeatureLayoutError):
        raise FeatureLayoutError(*hit.args)
    return hit


def _fill_value(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise FeatureLayoutError(f"fill value {value!r} is not a number")
    if isinstance(value, str):
        named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
        if value not in named:
            raise FeatureLayoutError(f"fill value {value!r} is not one this reader knows")
        return named[value]
    return float(value)


def _parse_array_meta(raw: bytes) -> _ArrayMeta:
    """The one array form ``encode_features`` writes: one chunk, bytes (little endian), at
    most one blosc codec, no transformers. Anything else is refused, not guessed."""
    m = json.loads(raw)
    if m.get("zarr_format") != 3 or m.get("node_type") != "array":
        raise FeatureLayoutError("not a zarr v3 array")
    shape = tuple(int(v) for v in m["shape"])
    grid = m["chunk_grid"]
    if grid.get("name") != "regular" or tuple(grid["configuration"]["chunk_shape"]) != shape:
        raise FeatureLayoutError(f"chunked as {grid}, not one chunk of {list(shape)}")
    keys = m.get("chunk_key_encoding", {"name": "default"})
    if keys.get("name") != "default" or keys.get("configuration", {}).get("separator", "/") != "/":
        raise FeatureLayoutError(f"chunk key encoding {keys} is not zarr v3's default")
    if m.get("storage_transformers"):
        raise FeatureLayoutError("uses storage transformers")
    codecs = m["codecs"]
    first = codecs[0] if codecs else {}
    endian = (first.get("configuration") or {}).get("endian", "little")
    if first.get("name") != "bytes" or endian != "little":
        raise FeatureLayoutError(f"codec chain {[c.get('name') for c in codecs]} does not start with little-endian bytes")
    rest = [c.get("name") for c in codecs[1:]]
    if rest not in ([], ["blosc"]):
        raise FeatureLayoutError(f"codecs {rest} after bytes: this reader takes none or one blosc")
    return _ArrayMeta(shape, str(m["data_type"]), bool(rest), _fill_value(m.get("fill_value", 0)))


def _parse_group_meta(raw: bytes) -> tuple[str, dict[str, str]]:
    m = json.loads(raw)
    attrs = (m.get("attributes") or {}).get("iosd_features")
    if m.get("zarr_format") != 3 or m.get("node_type") != "group" or not isinstance(attrs, dict):
        raise FeatureLayoutError("not an iosd feature group (no zarr v3 group with iosd_features attributes)")
    dtype = attrs.get("dtype")
    if dtype not in STORED_DTYPES:
        raise FeatureLayoutError(f"features stored as {dtype!r}, which this iosd does not read (it reads {', '.join(STORED_DTYPES)})")
    return dtype, dict(attrs["layers"])


class _ViewFile:
    """A read-only, seekable file over a buffer: zipfile reads the member table through it
    without a copy of the whole member (io.BytesIO copies anything but ``bytes``)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.view) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        out = bytes(self.view[self.pos : end])
        self.pos = max(self.pos, end)
        return out

    def seekable(self) -> bool:
        return True


class _Entry(NamedTuple):
    header_offset: int
    compress_size: int
    compress_type: int
    flag_bits: int


_END = struct.Struct("<4s4xHHIIH")  # end of central directory: signature, entries (disk, total), size, offset, comment length
_CENTRAL = struct.Struct("<4s4xHH4xIIIHHH8xI")  # signature, flags, method, crc, sizes, name/extra/comment lengths, offset


def _central_directory(view: memoryview) -> dict[str, _Entry] | None:
    """name -> entry of a plain zip (no comment, no zip64, as encode_features writes it), read
    in place; None for anything else (zipfile reads it). A tenth of zipfile's time: features
    have dozens of entries per sample."""
    if len(view) < _END.size:
        return None
    signature, on_disk, count, size, offset, comment = _END.unpack_from(view, len(view) - _END.size)
    if signature != b"PK\x05\x06" or comment or on_disk != count or offset + size != len(view) - _END.size:
        return None
    entries, pos = {}, offset
    for _ in range(count):
        if pos + _CENTRAL.size > offset + size:
            return None
        sig, flags, method, _crc, csize, usize, name_len, extra_len, comment_len, header = _CENTRAL.unpack_from(view, pos)
        if sig != b"PK\x01\x02" or 0xFFFFFFFF in (csize, usize, header):
            return None
        start = pos + _CENTRAL.size
        entries[bytes(view[start : start + name_len]).decode("utf-8" if flags & 0x800 else "cp437")] = _Entry(header, csize, method, flags)
        pos = start + name_len + extra_len + comment_len
    return entries if pos == offset + size else None


class _Members:
    """The entries of a zip held in memory; stored entries come back as views (no copy)."""

    def __init__(self, data) -> None:
        self.view = memoryview(data).cast("B")
        self.infos = _central_directory(self.view)
        self.zip = None
        if self.infos is None:
            self.zip = zipfile.ZipFile(_ViewFile(self.view))
            self.infos = self.zip.NameToInfo

    def get(self, name: str):
        info = self.infos.get(name)
        if info is None:
            return None
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            # deflated by some other tool: zipfile inflates it
            return (self.zip or zipfile.ZipFile(_ViewFile(self.view))).read(name)
        signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(self.view, info.header_offset)
        if signature != _LOCAL_SIGNATURE:
            raise ValueError(f"zip entry {name}: bad local header")
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        end = start + info.compress_size
        if end > len(self.view):
            raise ValueError(f"zip entry {name} runs past the end of the member (truncated)")
        return self.view[start:end]


def _read_array(members: _Members, key: str, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
    raw = members.get(f"{key}/zarr.json")
    if raw is None:
        raise FeatureLayoutError(f"{what}: no array {key!r}")
    meta = _cached(bytes(raw), _parse_array_meta)
    if meta.shape != shape:
        raise FeatureLayoutError(f"{what} is {list(meta.shape)}, the layout says {list(shape)}")
    if np.dtype(meta.data_type) != dtype:
        raise FeatureLayoutError(f"{what} is stored {meta.data_type}, the layout says {dtype.name}")
    chunk = members.get(f"{key}/c/" + "/".join("0" * len(shape)) if shape else f"{key}/c")
    if chunk is None:  # zarr writes no chunk that is all fill value
        return np.full(shape, meta.fill_value, dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if meta.compressed:
        import numcodecs.blosc

        if len(chunk) < _BLOSC_HEADER.size:
            raise ValueError(f"{what}: blosc chunk of {len(chunk)} bytes (truncated)")
        size, _, cbytes = _BLOSC_HEADER.unpack_from(chunk)
        if size != nbytes or cbytes != len(chunk):
            raise ValueError(f"{what}: blosc chunk of {len(chunk)} bytes holds {size} (its header: {cbytes} and {size}), {nbytes} expected")
        out = np.empty(shape, dtype)
        numcodecs.blosc.decompress(chunk, out)
        return out
    if len(chunk) != nbytes:
        raise ValueError(f"{what}: chunk holds {len(chunk)} bytes, {nbytes} expected")
    return np.frombuffer(chunk, dtype).reshape(shape)


def read_stored(data: bytes | memoryview, layers: Iterable[tuple[str, Iterable[int]]], dtype: str | None = None) -> StoredFeatures:
    """The layers of ``feat.zarr.zip`` bytes in their stored dtype, trusting a known layout.

    ``layers``: (path, (C, H, W)) pairs, as the manifest states them; ``dtype``: the stored
    feature dtype it states (None: the group's own, e.g. for sets without a manifest).
    Raises FeatureLayoutError when the member differs from that (another shape, dtype, key
    or array form) and ValueError / zipfile.BadZipFile when its bytes are damaged. Arrays of
    uncompressed members are read-only views of ``data``."""
    members = _Members(data)
    group = members.get("zarr.json")
    if group is None:
        raise FeatureLayoutError("no zarr.json: not a zarr group")
    stored_dtype, keys = _cached(bytes(group), _parse_group_meta)
    if dtype is not None and stored_dtype != dtype:
        raise FeatureLayoutError(f"features are stored {stored_dtype}, the manifest says {dtype}")
    np_dtype = STORED_DTYPES[stored_dtype]
    out = StoredFeatures(stored_dtype, {})
    for path, shape in layers:
        shape = tuple(int(v) for v in shape)
        key = keys.get(path)
        if key is None:
            raise FeatureLayoutError(f"no feature layer {path}")
        out.arrays[path] = _read_array(members, key, shape, np_dtype, f"layer {path}")
        if stored_dtype in SCALED:
            out.scales[path] = _read_array(members, f"{key}{SCALE_SUFFIX}", shape[:1], np.dtype("<f4"), f"scales of layer {path}")
    return out


# -- finite checks on stored arrays ------------------------------------------------------------

# dtype -> (signed and unsigned views of its bits, smallest non-finite magnitude: exponent all
# ones). A value is non-finite iff its magnitude bits reach that limit: for a positive value the
# signed view then reaches it too, for a negative one the unsigned view reaches sign | limit. So
# two max reductions over the stored bits, without a temporary, answer exactly.
_NONFINITE = {"float16": (np.int16, np.uint16, 0x7C00), "bfloat16": (np.int16, np.uint16, 0x7F80), "fp8": (np.int8, np.uint8, 0x7F)}


def all_finite(stored: np.ndarray, dtype: str) -> bool:
    """No NaN or infinity in a stored array: the same answer as ``np.isfinite(x).all()`` on its
    values, read from the bits (a fraction of np.isfinite's time on float16). int8 is always finite."""
    if dtype not in _NONFINITE:
        return dtype in SCALED or bool(np.isfinite(stored).all())
    if stored.size == 0:
        return True
    signed, unsigned, limit = _NONFINITE[dtype]
    sign = 1 << (8 * np.dtype(signed).itemsize - 1)
    return bool(stored.view(signed).max() < limit) and bool(stored.view(unsigned).max() < (sign | limit))


def copy_finite(dst: np.ndarray, src: np.ndarray, dtype: str) -> bool:
    """Copy ``src`` into ``dst`` (same shape, writable) and say whether it holds only finite
    values, checked on ``dst`` while it is in the cache."""
    np.copyto(dst, src)
    return all_finite(dst, dtype)
