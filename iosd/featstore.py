"""Per-sample UNet features as one ``feat.zarr.zip`` member: a zarr v3 group, one array per layer.

Arrays are stored float16, bfloat16 (as uint16 bits, the dtype in the array's attributes)
or int8 with a float32 per-channel scale array ``<key>__scale``. Compression is a
numcodecs Blosc codec; ``bench/codecs.py`` measured the choice (see ``CODECS``).
Readers need nothing but ``zipfile`` and ``zarr``.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import cpu
from zarr.storage import MemoryStore

from iosd.errors import UserError
from iosd.layers import FEATURE_DTYPES, layer_key

# name -> zarr v3 codec list; every entry is numcodecs underneath.
CODECS = {
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
    "none": lambda: [],
}
DEFAULT_CODEC = "blosc-zstd"


def _quantize(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Cast one (C, H, W) float array to its stored form (and int8 per-channel scales)."""
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # round to nearest even, as torch does when casting to bfloat16
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16), None
    if dtype == "int8":
        x32 = x.astype(np.float32)
        scale = np.abs(x32.reshape(x32.shape[0], -1)).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x32 / scale[:, None, None]), -127, 127).astype(np.int8)
        return q, scale
    raise UserError(f"unknown feature dtype {dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")


def _dequantize(stored: np.ndarray, dtype: str, scale: np.ndarray | None) -> np.ndarray:
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    if dtype == "int8":
        return stored.astype(np.float32) * scale[:, None, None]
    return stored.astype(np.float32)


def encode_features(layers: dict[str, np.ndarray], dtype: str = "float16", codec: str = DEFAULT_CODEC) -> bytes:
    """Zip bytes of a zarr v3 group holding each layer (path -> (C, H, W) array)."""
    if codec not in CODECS:
        raise UserError(f"unknown feature codec {codec!r}", f"use one of {', '.join(CODECS)}")
    stored = {path: _quantize(np.asarray(x), dtype) for path, x in layers.items()}
    attrs = {"iosd_features": {"dtype": dtype, "codec": codec, "layers": {p: layer_key(p) for p in layers}}}
    store = MemoryStore()
    group = zarr.create_group(store=store, attributes=attrs)  # attributes at creation: zarr.json once
    for path, (q, scale) in stored.items():
        key = layer_key(path)
        arr = group.create_array(key, shape=q.shape, dtype=q.dtype, chunks=q.shape, compressors=CODECS[codec]())
        arr[...] = q
        if scale is not None:
            sarr = group.create_array(f"{key}__scale", shape=scale.shape, dtype=scale.dtype, chunks=scale.shape, compressors=[])
            sarr[...] = scale
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(store._store_dict):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # byte-identical reruns
            zf.writestr(info, store._store_dict[name].to_bytes())
    return buf.getvalue()


def open_feature_group(data: bytes) -> zarr.Group:
    """The zarr group inside ``feat.zarr.zip`` bytes, read from memory."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        entries = {n: cpu.Buffer.from_bytes(zf.read(n)) for n in zf.namelist()}
    return zarr.open_group(MemoryStore(entries, read_only=True), mode="r")


def decode_features(data: bytes, layers: list[str] | None = None) -> dict[str, np.ndarray]:
    """Layer path -> float32 (C, H, W) array, dequantised; ``layers`` selects a subset."""
    group = open_feature_group(data)
    meta = group.attrs["iosd_features"]
    wanted = layers if layers is not None else list(meta["layers"])
    out = {}
    for path in wanted:
        key = meta["layers"][path]
        scale = group[f"{key}__scale"][...] if meta["dtype"] == "int8" else None
        out[path] = _dequantize(group[key][...], meta["dtype"], scale)
    return out
