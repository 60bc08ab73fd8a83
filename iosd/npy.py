"""A sample's ``.npy`` and ``.npz`` members read without ``np.load``'s per-call machinery.

The training loader reads two small NumPy members per sample (class embeddings, masks);
``np.load`` spends more on them than on the features' megabytes: a zipfile central
directory parse, an ``ast`` parse of every header and an extra copy of the inflated data.
Here each distinct header is parsed once per process, a npz member is inflated straight from
its local header, and anything this reader does not recognise goes to ``np.load``, so the
answer is always NumPy's own.
"""

from __future__ import annotations

import ast
import io
import struct
import zlib

import numpy as np

_MAGIC = b"\x93NUMPY"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name and extra lengths
_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...]] | None] = {}


def _header(raw: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, shape) of a C-order .npy header, or None for anything else (np.load reads it)."""
    parsed = _HEADERS.get(raw)
    if parsed is None and raw not in _HEADERS:
        try:
            d = ast.literal_eval(raw.decode("latin1"))
            dtype = np.dtype(d["descr"])
            ok = not d["fortran_order"] and not dtype.hasobject and set(d) == {"descr", "fortran_order", "shape"}
            parsed = (dtype, tuple(int(v) for v in d["shape"])) if ok else None
        except Exception:
            parsed = None
        if len(_HEADERS) < 4096:
            _HEADERS[raw] = parsed
    return parsed


def _array(data, offset: int = 0) -> np.ndarray | None:
    """The array of .npy bytes starting at ``offset`` (a view: no copy), or None."""
    view = memoryview(data)
    if bytes(view[offset : offset + 6]) != _MAGIC or len(view) < offset + 10:
        return None
    major = view[offset + 6]
    if major == 1:
        size, start = struct.unpack_from("<H", view, offset + 8)[0], offset + 10
    elif major in (2, 3):
        size, start = struct.unpack_from("<I", view, offset + 8)[0], offset + 12
    else:
        return None
    parsed = _header(bytes(view[start : start + size]))
    if parsed is None:
        return None
    dtype, shape = parsed
    begin = start + size
    count = int(np.prod(shape, dtype=np.int64))
    if len(view) - begin != count * dtype.itemsize:
        return None
    return np.frombuffer(view, dtype, count, begin).reshape(shape)


def read_npy(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` member (read-only)."""
    out = _array(data)
    return out if out is not None else np.load(io.BytesIO(bytes(data)), allow_pickle=False)


def read_npz(data: bytes, name: str) -> np.ndarray:
    """Array ``name`` of a ``.npz`` member whose first entry is ``name.npy``, deflated or
    stored (as ``np.savez_compressed`` / ``np.savez`` write it)."""
    out = None
    try:
        sig, _, flags, method, _, _, crc, _, _, name_len, extra_len = _LOCAL.unpack_from(data, 0)
        start = _LOCAL.size + name_len + extra_len
        if sig == b"PK\x03\x04" and not flags & 0x9 and bytes(data[_LOCAL.size : _LOCAL.size + name_len]) == f"{name}.npy".encode():
            if method == 8:  # deflate, inflated to its end (sizes may sit in a zip64 extra field)
                body = zlib.decompressobj(-15).decompress(memoryview(data)[start:])
                out = _array(body) if zlib.crc32(body) == crc else None
    except (struct.error, zlib.error):
        out = None
    if out is not None:
        return out
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as z:
        return z[name]
