"""The loader's tar member scan reads every tar exactly as tarfile does."""

from __future__ import annotations

import io
import mmap
import tarfile

import pytest

from iosd.train.tarscan import members


def _tar(fmt: int, entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _by_tarfile(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(i.name, i.offset, i.offset_data, i.size, i.isfile()) for i in tar]


def _by_scan(data: bytes, tmp_path) -> list[tuple]:
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            return [tuple(member) for member in members(view, f)]
        finally:
            view.release()


SAMPLES = [("000000_00001.png", b"x" * 700), ("000000_00001.json", b"{}"), ("000000_00001.feat.zarr.zip", b"z" * 1024), ("dir", None)]
LONG = [("a" * 150 + ".json", b"{}"), ("b/" * 70 + "c.npy", b"y" * 5), ("ünïcode.json", b"1")]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("entries", [SAMPLES, SAMPLES + LONG, LONG + SAMPLES], ids=["plain", "then-long", "long-first"])
def test_members_equal_tarfiles(fmt, entries, tmp_path):
    if fmt == tarfile.USTAR_FORMAT and entries is not SAMPLES:
        entries = [e for e in entries if len(e[0].encode()) <= 100 or "/" in e[0]]  # ustar: prefix names only
    data = _tar(fmt, entries)
    assert _by_scan(data, tmp_path) == _by_tarfile(data)


def test_damaged_tars_read_as_tarfile_reads_them(tmp_path):
    data = _tar(tarfile.PAX_FORMAT, SAMPLES)
    second = 512 + 1024  # the second member's header
    bad = bytearray(data)
    bad[second + 10] ^= 0x41  # a bad checksum mid-archive: tarfile stops there
    assert _by_scan(bytes(bad), tmp_path) == _by_tarfile(bytes(bad)) == _by_tarfile(data)[:1]
    short = data[: second + 300]  # a truncated header: tarfile stops there too
    assert _by_scan(short, tmp_path) == _by_tarfile(short)
    bad = bytearray(data)
    bad[10] ^= 0x41  # a bad first header: not a tar
    with pytest.raises(tarfile.ReadError):
        _by_scan(bytes(bad), tmp_path)


def test_shard_writers_tars_never_reach_tarfile(tmp_path, monkeypatch):
    """What shard writers emit (short names, regular files) is scanned in place."""
    import iosd.train.tarscan as tarscan

    data = _tar(tarfile.PAX_FORMAT, SAMPLES)
    expected = _by_tarfile(data)
    monkeypatch.setattr(tarscan.tarfile, "open", lambda *a, **k: pytest.fail("fell back to tarfile"))
    assert _by_scan(data, tmp_path) == expected
