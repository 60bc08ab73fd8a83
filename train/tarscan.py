"""The members of a tar held in memory, at the speed of reading their headers.

``tarfile`` spends ~80 microseconds a member (a Python object per header field, a read and
a seek per member); a training sample has five members, so at the real sizes the member
table alone cost a tenth of the loader's time per sample. Here the plain ustar headers that
shard writers emit (regular files, short names, octal sizes, checksum verified) are read in
place; at the first header of any other kind (pax or GNU extensions, long or prefixed names,
base-256 sizes, a bad checksum) the rest of the tar is read by ``tarfile`` itself, so every
tar reads exactly as ``tarfile`` reads it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

BLOCK = 512
_PLAIN_FILE = (b"0", b"\0")
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: no data to read
_USTAR = (b"ustar\x0000", b"ustar  \0")


class Member(NamedTuple):
    name: str
    offset: int  # of its header
    offset_data: int
    size: int
    isfile: bool


def _plain_header(h: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a header this scanner reads itself, or None for tarfile."""
    if h[124] & 0x80 or h[257:265] not in (*_USTAR, b"\0" * 8) or (h[257:263] == b"ustar\x00" and h[345]):
        return None  # base-256 size, an unknown format, or a ustar name prefix
    try:
        checksum = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(h[:148]) + 256 + sum(h[156:]):  # the checksum field counts as spaces
        return None
    typeflag, name = h[156:157], h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if typeflag not in _PLAIN_FILE + _SKIPPED or (typeflag == b"\0" and name.endswith("/")):
        return None  # extensions, sparse or contiguous files, an old-style directory
    return (name.rstrip("/") if typeflag == b"5" else name), size, typeflag  # tarfile strips a directory's slash


def members(view: memoryview, file: BinaryIO) -> Iterator[Member]:
    """Every member of the tar whose bytes ``view`` holds (``file``: the same tar, for tarfile).
    Damaged tars raise ``tarfile.ReadError`` as tarfile does."""
    pos, size = 0, len(view)
    while pos + BLOCK <= size:
        h = bytes(view[pos : pos + BLOCK])
        if not any(h):
            return  # end-of-archive block
        plain = _plain_header(h)
        if plain is None:
            break
        name, length, typeflag = plain
        isfile = typeflag in _PLAIN_FILE
        yield Member(name, pos, pos + BLOCK, length, isfile)
        pos += BLOCK + (-(-length // BLOCK) * BLOCK if isfile else 0)  # as tarfile: links and directories hold no data
    else:
        return  # the end of the file (a truncated last member is the caller's to see)
    file.seek(pos)  # from here on, tarfile reads (its offsets are the file's)
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for info in tar:
            yield Member(info.name, info.offset, info.offset_data, info.size, info.isfile())
