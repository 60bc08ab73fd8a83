"""Where a shard set is written: a local directory, or any fsspec URL (s3://, gs://, ...).

Local directories keep the fast path (a temp file beside the final name, 8 MiB writes,
fsync, ``os.replace``). For a URL, each shard is written to a local spool file while it is
hashed, then uploaded whole to its final key, and only then is its record written: an object
store shows a key only once its upload completes, so no partial shard is ever visible under
a final name, and resuming lists the records (and checks each tar's size) as on disk.
``dataset.json`` and ``wids-index.json`` are put whole. Readers (``iosd-shards verify/info/show``)
stream each member once through ``open``, the same for a directory and a URL.

The endpoint and credentials come the fsspec/s3fs way: the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...) or fsspec's
configuration (``FSSPEC_S3='{"endpoint_url": ...}'`` or ``~/.config/fsspec/s3.json``). The
spool directory is ``IOSD_SPOOL_DIR``, else the system temp directory (``TMPDIR``): it needs
room for the shards in flight (one per writer thread).
"""

from __future__ import annotations

import functools
import os
import posixpath
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

from iosd.errors import RESUME, UserError, remote_error
from iosd.manifest import json_text, write_bytes_atomic

T = TypeVar("T")
SPOOL_ENV = "IOSD_SPOOL_DIR"
READ_BLOCK_SIZE = 16 << 20  # a URL read sequentially (iosd-shards verify): one ranged GET per 16 MiB


def is_remote(target: str | os.PathLike) -> bool:
    """A URL with a scheme other than file:// (a Windows drive letter is not a scheme)."""
    text = os.fspath(target)
    scheme = urlparse(text).scheme if isinstance(text, str) and "://" in text else ""
    return len(scheme) > 1 and scheme != "file"


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or a URL."""
    return posixpath.join(str(base), name) if is_remote(base) else os.path.join(base, name)


def base_name(target: str | os.PathLike) -> str:
    """The last component of a directory path or URL (``s3://b/sets/coco2/`` -> ``coco2``)."""
    text = os.fspath(target)
    if is_remote(text):
        return posixpath.basename(urlparse(text).path.rstrip("/")) or urlparse(text).netloc
    return Path(text).resolve().name


class Target:
    """A shard being written: ``tmp`` is the local file to fill; ``commit`` makes it visible
    under its final name, ``discard`` removes every trace of it."""

    def __init__(self, tmp: Path, commit: Callable[[], None], durable: bool) -> None:
        self.tmp, self._commit, self.durable = tmp, commit, durable

    def commit(self) -> None:
        """Rename (a directory) or upload whole (a URL): the shard appears complete or not at all."""
        self._commit()

    def discard(self) -> None:
        """Remove the temp or spool file after a failure."""
        self.tmp.unlink(missing_ok=True)


class LocalStore:
    """A local directory: exactly the file operations the writer always made."""

    remote = False

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root[len("file://"):] if isinstance(root, str) and root.startswith("file://") else root)
        self.location = str(root)

    @property
    def name(self) -> str:
        """The set's own name (wids-index.json's ``name``)."""
        return self.root.resolve().name

    def shown(self, name: str) -> str:
        """A member as the user knows it (path or URL), for messages."""
        return str(self.root / name)

    def is_file(self) -> bool:
        """Whether the output itself is a file (never a set)."""
        return self.root.exists() and not self.root.is_dir()

    def has_entries(self) -> bool:
        """Whether the output holds anything (a new set or a resumed one)."""
        return self.root.exists() and any(self.root.iterdir())

    def read_bytes(self, name: str) -> bytes | None:
        """A member's bytes, None when it is not there."""
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def open(self, name: str) -> BinaryIO | None:
        """A member opened for one sequential read (a context manager), None when it is not there."""
        try:
            return open(self.root / name, "rb")
        except FileNotFoundError:
            return None

    def entries(self) -> list[str]:
        """Names directly in the directory (files and folders)."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def names(self, subdir: str = "", suffix: str = "") -> list[str]:
        """Names directly in ``subdir`` that end in ``suffix``."""
        folder = self.root / subdir
        return sorted(p.name for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """The bytes of those of ``names`` that can be read."""
        found = {}
        for name in names:
            try:
                found[name] = (self.root / name).read_bytes()
            except OSError:
                pass
        return found

    def sizes(self, names: list[str]) -> dict[str, int]:
        """Sizes of those of ``names`` that exist."""
        found = {}
        for name in names:
            try:
                found[name] = (self.root / name).stat().st_size
            except OSError:
                pass
        return found

    def remove(self, name: str) -> None:
        """Delete a member if it is there (--overwrite)."""
        (self.root / name).unlink(missing_ok=True)

    def remove_tree(self, subdir: str) -> None:
        """Delete a folder of members (--overwrite)."""
        shutil.rmtree(self.root / subdir, ignore_errors=True)

    def make(self, subdir: str, flag: str = "--out") -> None:
        """Create the directory (and ``subdir``) and prove it writable."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / subdir).mkdir(exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to {flag} {self.root} ({err.strerror})", "choose a writable directory") from None

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write a member whole: readers see the old one or the new one, never half."""
        write_bytes_atomic(self.root / name, data)

    def target(self, name: str) -> Target:
        """Where a shard is written before it becomes visible as ``name``."""
        final = self.root / name
        tmp = self.root / f".{name}.tmp-{os.getpid()}.{secrets.token_hex(4)}"
        return Target(tmp, lambda: os.replace(tmp, final), durable=True)


class RemoteStore:
    """A prefix in an object store through fsspec: whole-object puts, listings for resume.
    The methods mean what LocalStore's do; every call's fault is one line naming the URL."""

    remote = True

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        from fsspec.core import url_to_fs

        self.location = url.rstrip("/")
        try:
            # a fresh instance: no listing cached by an earlier run in this process, no dead connection
            self.fs, self.root = url_to_fs(self.location, skip_instance_cache=True, **(storage_options or {}))
        except ImportError as err:
            scheme = urlparse(url).scheme
            raise UserError(f"cannot write to {url}: the {scheme}:// filesystem is not installed ({err})", "pip install 'iosd[s3]' (s3fs) or gcsfs (gs://)") from None
        except ValueError as err:  # fsspec: unknown protocol
            raise UserError(f"cannot write to {url} ({err})", "use a local directory or an s3://, gs://, ... URL") from None
        self.root = self.root.rstrip("/")

    @property
    def name(self) -> str:
        return base_name(self.location)

    def shown(self, name: str) -> str:
        return f"{self.location}/{name}" if name else self.location

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _call(self, action: str, name: str, func: Callable[[], T]) -> T:
        """Run one store call; a connection, credential or bucket fault becomes one line naming the URL."""
        try:
            return func()
        except UserError:
            raise
        except Exception as err:
            line = remote_error(err, self.shown(name) if name else self.location, action, RESUME)
            if line is None:
                raise
            raise line from None

    def _list(self, subdir: str = "") -> list[dict]:
        def ls() -> list[dict]:
            try:
                return self.fs.ls(self._key(subdir), detail=True, refresh=True)
            except FileNotFoundError as err:
                if _missing_bucket(err):
                    raise
                return []  # an empty prefix: nothing there yet

        return self._call("list", subdir, ls)

    def is_file(self) -> bool:
        def check() -> bool:
            try:
                return self.fs.info(self.root).get("type") == "file"
            except FileNotFoundError:
                return False

        return self._call("read", "", check)

    def has_entries(self) -> bool:
        return bool(self._list())

    def read_bytes(self, name: str) -> bytes | None:
        def cat() -> bytes | None:
            try:
                return self.fs.cat_file(self._key(name))
            except FileNotFoundError as err:
                if _missing_bucket(err):
                    raise
                return None

        return self._call("read", name, cat)

    def open(self, name: str) -> BinaryIO | None:
        """An object streamed once from start to end (ranged GETs of READ_BLOCK_SIZE, never the
        whole object in memory or on disk); None when it is not there. Each read's store fault
        (a dropped connection, a timeout) is one line naming the object, as every call's."""

        def op():
            try:
                return self.fs.open(self._key(name), "rb", block_size=READ_BLOCK_SIZE, cache_type="readahead")
            except FileNotFoundError as err:
                if _missing_bucket(err):
                    raise
                return None

        f = self._call("read", name, op)
        return None if f is None else _StoreReader(self, name, f)

    def entries(self) -> list[str]:
        """Names directly under the prefix (objects and "folders")."""
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in self._list())

    def names(self, subdir: str = "", suffix: str = "") -> list[str]:
        return sorted(n for e in self._list(subdir) if e.get("type") == "file" and (n := posixpath.basename(e["name"])).endswith(suffix))

    def read_many(self, names: list[str]) -> dict[str, bytes]:
        """Several small objects in one concurrent fetch (the records, on resume)."""
        if not names:
            return {}
        keys = {self._key(n): n for n in names}
        got = self._call("read", posixpath.dirname(names[0]), lambda: self.fs.cat(list(keys), on_error="return"))
        for value in got.values():
            if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                self._call("read", posixpath.dirname(names[0]), functools.partial(_reraise, value))
        return {keys[k]: v for k, v in got.items() if isinstance(v, bytes) and k in keys}

    def sizes(self, names: list[str]) -> dict[str, int]:
        """Sizes of those of ``names`` that exist, from one listing per folder."""
        listed: dict[str, int] = {}
        for folder in sorted({posixpath.dirname(n) for n in names}):
            for entry in self._list(folder):
                if entry.get("type") == "file":
                    listed[posixpath.join(folder, posixpath.basename(entry["name"]))] = int(entry.get("size") or 0)
        return {n: listed[n] for n in names if n in listed}

    def remove(self, name: str) -> None:
        def rm() -> None:
            try:
                self.fs.rm_file(self._key(name))
            except FileNotFoundError:
                pass

        self._call("delete", name, rm)

    def remove_tree(self, subdir: str) -> None:
        for name in self.names(subdir):
            self.remove(f"{subdir}/{name}")

    def make(self, subdir: str, flag: str = "--out") -> None:
        """Prove the bucket exists and takes writes (a zero-byte probe, put and deleted):
        the endpoint, credentials and bucket are checked before any work."""
        probe = f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        self._call("write to", "", lambda: self.fs.pipe_file(self._key(probe), b""))
        self.remove(probe)

    def put_bytes(self, name: str, data: bytes) -> None:
        self._call("write", name, lambda: self.fs.pipe_file(self._key(name), data))

    def pull(self, local: Path) -> int:
        """Download every object under the prefix that ``local`` lacks (or holds at another
        size) into ``local``; returns how many. For outputs built in a staging directory."""
        entries = self._call("list", "", lambda: self.fs.find(self.root, detail=True)) if self.has_entries() else {}
        wanted = []
        for key, entry in entries.items():
            rel = key[len(self.root) + 1:]
            path = local / rel
            if rel and entry.get("type") == "file" and not (path.is_file() and path.stat().st_size == int(entry.get("size") or 0)):
                path.parent.mkdir(parents=True, exist_ok=True)
                wanted.append((key, path))
        for key, path in wanted:  # each to a temp name, renamed when whole
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                self._call("download", key[len(self.root) + 1:], lambda k=key, t=tmp: self.fs.get_file(k, str(t)))
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return len(wanted)

    def push(self, local: Path, *, last: tuple[str, ...] = ()) -> int:
        """Upload every file under ``local`` (hidden temp files aside), each whole: data files
        the prefix lacks at their size first, then ``.parts`` records, then the set-wide
        top-level files (always: each run rebuilds them), ``last`` at the very end; returns
        how many."""
        held = {}
        if self.has_entries():
            for key, entry in self._call("list", "", lambda: self.fs.find(self.root, detail=True)).items():
                held[key[len(self.root) + 1:]] = int(entry.get("size") or 0)
        files = [p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")]

        def rank(path: Path) -> tuple[int, str]:
            rel = path.relative_to(local).as_posix()
            if rel in last:
                return 3, rel
            if "/" not in rel and not rel.endswith(".tar"):
                return 2, rel  # a set-wide file (index, manifest, preview): rebuilt by each run
            return (1 if rel.startswith(".") else 0), rel

        sent = 0
        for path in sorted(files, key=rank):
            rel = path.relative_to(local).as_posix()
            if rank(path)[0] < 2 and held.get(rel) == path.stat().st_size:
                continue  # already there (names are content: the same file)
            self._call("upload", rel, lambda p=path, r=rel: self.fs.put_file(str(p), self._key(r)))
            sent += 1
        return sent

    def target(self, name: str) -> Target:
        spool = Path(os.environ.get(SPOOL_ENV) or tempfile.gettempdir())
        spool.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=spool)
        os.close(fd)
        path = Path(tmp)

        def upload() -> None:
            self._call("upload", name, lambda: self.fs.put_file(str(path), self._key(name)))
            path.unlink(missing_ok=True)

        return Target(path, upload, durable=False)


class _StoreReader:
    """A RemoteStore object open for reading: ``read`` and ``close`` through the store's fault lines."""

    def __init__(self, store: RemoteStore, name: str, f) -> None:
        self.store, self.name, self.f = store, name, f

    def read(self, size: int = -1) -> bytes:
        return self.store._call("read", self.name, lambda: self.f.read(size))

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> _StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _missing_bucket(err: FileNotFoundError) -> bool:
    """A missing bucket (S3's NoSuchBucket: "The specified bucket does not exist"), not a missing
    key: the key's error names its path, which may well hold "bucket" (s3://my-bucket/...)."""
    text = str(err).lower()
    return "specified bucket" in text or "nosuchbucket" in text


def _reraise(err: BaseException) -> None:
    raise err


Store = LocalStore | RemoteStore


def open_store(out: str | os.PathLike, storage_options: dict | None = None) -> Store:
    """The store of an output: a LocalStore for paths (and file://), a RemoteStore for URLs."""
    return RemoteStore(os.fspath(out), storage_options) if is_remote(out) else LocalStore(out)


def staging_dir(url: str) -> Path:
    """A local directory for an output built whole before upload (iosd-synth --out URL): under
    the spool directory, named by the URL so a rerun on this machine finds it again."""
    import hashlib

    path = Path(os.environ.get(SPOOL_ENV) or tempfile.gettempdir()) / f"iosd-stage-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def put_json(store: Store, name: str, obj: Any) -> None:
    """JSON written whole, in the layout write_json_atomic writes."""
    store.put_bytes(name, json_text(obj).encode("utf-8"))
