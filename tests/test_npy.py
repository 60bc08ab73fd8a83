"""The loader's lean .npy / .npz reader gives NumPy's own answer, or defers to np.load."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from iosd.npy import read_npy, read_npz
from iosd.schema import _npy, _npz


def _saved(arr: np.ndarray, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, masks=arr)
    return buf.getvalue()


@pytest.mark.parametrize("arr", [
    np.zeros((0, 8, 8), np.uint8),
    (np.random.default_rng(0).random((3, 64, 48)) > 0.5).astype(np.uint8),
    np.arange(24, dtype=">f4").reshape(2, 3, 4),  # big-endian: still NumPy's answer
    np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4)),  # Fortran order: np.load reads it
    np.float32(3.5) * np.ones(()),
])
def test_lean_reads_equal_np_load(arr):
    for data in (_npz(masks=arr), _saved(arr, compressed=False)):
        with np.load(io.BytesIO(data)) as z:
            expected = z["masks"]
        got = read_npz(data, "masks")
        assert got.dtype == expected.dtype and got.shape == expected.shape and np.array_equal(got, expected)
    got = read_npy(_npy(arr))
    assert got.dtype == arr.dtype and np.array_equal(got, arr)


def test_damaged_members_fail_as_np_load_does():
    data = _npz(masks=np.ones((2, 32, 32), np.uint8))
    with pytest.raises(zipfile.BadZipFile):
        read_npz(data[: len(data) // 2], "masks")
    corrupt = bytearray(data)
    corrupt[60] ^= 0xFF  # inside the deflate stream: the CRC (or inflate) refuses it
    with pytest.raises(zipfile.BadZipFile):
        read_npz(bytes(corrupt), "masks")
    with pytest.raises(KeyError):
        read_npz(data, "other")
    with pytest.raises(ValueError):
        read_npy(_npy(np.ones(4, np.float32))[:-3])


def test_iosds_own_members_take_the_lean_path():
    """What iosd writes is read without np.load (a view of the inflated bytes: read-only)."""
    masks = read_npz(_npz(masks=np.ones((2, 32, 32), np.uint8)), "masks")
    embeddings = read_npy(_npy(np.ones((2, 64), np.float32)))
    assert not masks.flags.writeable and not embeddings.flags.writeable
