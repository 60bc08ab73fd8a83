"""Write a shard set: one tar per shard under a temp name, renamed when complete, plus a
per-shard record; ``dataset.json`` is rebuilt atomically from the records.

Shards are independent (their content depends only on seed, config and index), so ranks
and resumed runs need no coordination beyond which indices they own: a shard is done when
both its tar and its record exist.

Beside ``dataset.json``, ``wids-index.json`` lists the same finished shards in the shard
index format of ``wids`` (webdataset's random-access reader), with URLs relative to the
directory, so ``wids.ShardListDataset("DIR/wids-index.json")`` reads the set as it is.

The output may be an fsspec URL (``s3://bucket/set``): iosd.store spools each shard locally and
uploads it whole before its record, so the same rules hold in an object store.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from iosd import __version__
from iosd.errors import UserError, name_path
from iosd.manifest import check_schema
from iosd.projection import PROJECTION_NAME
from iosd.schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_GLOB, shard_name
from iosd.store import open_store, put_json

PARTS_DIR = ".parts"
WRITE_BUFFER = 8 << 20  # bytes per write() to the shard file (see _HashingSink)
WIDS_INDEX_NAME = "wids-index.json"


def wids_index(records: list[dict], name: str) -> dict:
    """The wids shard index of finished shards (URLs relative to the index's directory)."""
    return {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name,
        "shardlist": [{"url": r["name"], "nsamples": int(r["samples"]), "filesize": int(r["bytes"])} for r in records],
    }


def add_counts(total: dict, part: dict) -> dict:
    """Sum nested count dicts (ints at the leaves)."""
    for key, value in part.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value
    return total


class _HashingSink:
    """The tar stream's file: tarfile's 10 KiB records are hashed as they pass (no second
    read of the shard for its sha256) into a file buffered in 8 MiB writes (a thousand times
    fewer system calls, and page-cache folios that a reader copies from at memory speed
    rather than at a third of it)."""

    def __init__(self, f) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class ShardSetWriter:
    """Owns one output directory: refuses foreign or differently-configured ones, resumes its own."""

    def __init__(self, out: str | Path, header: dict, n_shards: int, *, overwrite: bool = False) -> None:
        self.store = open_store(out)  # a local directory (the fast path) or an fsspec URL: iosd/store.py
        self.out = Path(out) if not self.store.remote else self.store.location  # a URL stays a string
        self.header = header  # manifest fields fixed by the config (identity, layout, ...)
        self.n_shards = n_shards
        self.overwrite = overwrite
        self.parts = self.out / PARTS_DIR if not self.store.remote else f"{self.out}/{PARTS_DIR}"
        self._read: dict[str, bytes] = {}  # records already read: each rebuild fetches only new ones

    # -- opening -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0: make the directory ours (new, resumed, or overwritten) and write a first manifest."""
        manifest_path = self.store.shown(MANIFEST_NAME)
        if self.store.is_file():
            raise UserError(f"--out {self.out} is a file", "choose a directory")
        held = self.store.read_bytes(MANIFEST_NAME) if self.store.has_entries() else None
        if self.store.has_entries() and not (held is None and self._just_opened()):
            if held is None:
                raise UserError(f"--out {self.out} holds files that are not an iosd shard set", "choose a new or empty directory")
            try:
                old = check_schema(json.loads(held), manifest_path)
            except json.JSONDecodeError:
                if not self.overwrite:
                    raise UserError(f"{manifest_path} is corrupt", "pass --overwrite to regenerate, or another --out") from None
                old = None  # --overwrite replaces a damaged manifest like any other
            except UserError:
                if not self.overwrite:
                    raise
                old = None
            if old is None or old.get("identity") != self.header["identity"]:
                if not self.overwrite:  # old is a valid manifest here: a damaged one raised above
                    diff = sorted(k for k in set(old.get("identity", {})) | set(self.header["identity"]) if old.get("identity", {}).get(k) != self.header["identity"].get(k))
                    raise UserError(f"{self.out} was generated with a different config (differs in: {', '.join(diff)})", "pass --overwrite to replace it, or choose another --out")
                self._clear()
        self.store.make(PARTS_DIR)  # mkdir and a write probe (a URL: the endpoint, credentials and bucket)
        self.write_manifest()

    def _just_opened(self) -> bool:
        """Whether the directory holds only what another task's ``prepare`` makes before its first
        manifest lands (tasks started together may each open the set; the identity check runs
        on the manifest once there is one)."""
        opening = (f".{MANIFEST_NAME}.", f".{WIDS_INDEX_NAME}.", ".write-test-")
        for name in self.store.entries():
            if name == PARTS_DIR:
                if self.store.names(PARTS_DIR):
                    return False
            elif name != WIDS_INDEX_NAME and not name.startswith(opening):
                return False
        return True

    def _clear(self) -> None:
        """--overwrite: remove this set's own files only."""
        self._read.clear()
        for tar in self.store.names("", ".tar"):
            if fnmatch.fnmatch(tar, SHARD_GLOB):
                self.store.remove(tar)
        self.store.remove_tree(PARTS_DIR)
        self.store.remove(MANIFEST_NAME)
        self.store.remove(WIDS_INDEX_NAME)
        self.store.remove(PROJECTION_NAME)  # --project writes its own after this

    def _finished(self) -> dict[int, dict]:
        """Records of the shards whose tar and record both exist and agree in size."""
        finished = {}
        listed = [f"{PARTS_DIR}/{n}" for n in self.store.names(PARTS_DIR, ".json")]
        self._read.update(self.store.read_many([n for n in listed if n not in self._read]))
        held = {n: self._read[n] for n in listed if n in self._read}
        sizes = self.store.sizes([shard_name(int(n[:-5].rsplit("-", 1)[1])) for n in held])  # one listing for a URL
        for name, data in held.items():
            index = int(name[:-5].rsplit("-", 1)[1])
            try:
                record = json.loads(data)
                if sizes[shard_name(index)] == record["bytes"]:
                    finished[index] = record
            except (OSError, ValueError, KeyError):
                pass  # missing tar, or a record cut short: regenerate the shard
        return finished

    def done(self) -> set[int]:
        """Indices of finished shards (the others are redone)."""
        return set(self._finished())

    # -- writing -----------------------------------------------------------------------
    def write_shard(self, index: int, samples: Iterable[dict], stats: dict) -> dict:
        """Write one shard's samples (WebDataset dicts) atomically; returns its record."""
        name = shard_name(index)
        final = self.store.shown(name)
        # a temp file beside the final name, unique among tasks on other machines too (same pid
        # in two containers): a race on one shard leaves two, each renamed whole over the same
        # final name. For a URL, a spool file uploaded whole once complete (iosd.store).
        target = self.store.target(name)
        tmp = target.tmp
        count = 0
        try:
            with open(tmp, "wb", buffering=WRITE_BUFFER) as f:
                hashed = _HashingSink(f)
                with wds.TarWriter(hashed, encoder=False, mtime=0, user="iosd", group="iosd") as sink:
                    for sample in samples:
                        sink.write(sample)
                        count += 1
                f.flush()
                if target.durable:
                    os.fsync(f.fileno())
            record = {"name": name, "index": index, "samples": count, "bytes": tmp.stat().st_size, "sha256": hashed.digest.hexdigest(), "stats": stats}
            target.commit()
        except BaseException as err:
            target.discard()
            name_path(err, final if target.durable else tmp)  # a full disk names the shard (a URL's: its spool file), not "[Errno 28]" alone
            raise
        put_json(self.store, f"{PARTS_DIR}/shard-{index:06d}.json", record)
        return record

    def records(self) -> list[dict]:
        finished = self._finished()
        return [finished[i] for i in sorted(finished)]

    def missing(self, recs: list[dict] | None = None) -> list[int]:
        """Planned shards without a finished tar and record (``recs``: records already read)."""
        recs = self.records() if recs is None else recs
        return sorted(set(range(self.n_shards)) - {int(r["index"]) for r in recs})

    def assemble(self) -> dict | None:
        """Independent tasks: dataset.json and wids-index.json once every shard's record is
        present (None before). Built from the records alone, so every task (or ``iosd-shards
        merge``) that assembles writes the same bytes: running it twice, or racing, is harmless."""
        recs = self.records()
        return None if self.missing(recs) else self.write_manifest(recs)

    def build_manifest(self, recs: list[dict] | None = None) -> dict:
        """dataset.json's content from the header and the finished shards' records."""
        recs = self.records() if recs is None else recs
        counts: dict = {}
        for rec in recs:
            add_counts(counts, rec["stats"])
        feat_bytes = counts.get("feature_bytes", 0)
        manifest = {
            **self.header,
            "schema_version": SCHEMA_VERSION,
            "iosd_version": __version__,
            "counts": counts,
            "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in recs],
            "planned_shards": self.n_shards,
            "complete": len(recs) == self.n_shards,
        }
        if counts.get("written"):
            manifest["features"] = {**manifest["features"], "stored_bytes_per_sample": round(feat_bytes / counts["written"])}
        return manifest

    def write_manifest(self, recs: list[dict] | None = None) -> dict:
        """Rebuild dataset.json from the header and every finished shard's record."""
        recs = self.records() if recs is None else recs
        manifest = self.build_manifest(recs)
        put_json(self.store, WIDS_INDEX_NAME, wids_index(recs, self.store.name))
        put_json(self.store, MANIFEST_NAME, manifest)
        return manifest
