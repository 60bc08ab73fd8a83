"""Write a shard set: one tar per shard under a temp name, renamed when complete, plus a
per-shard record; ``dataset.json`` is rebuilt atomically from the records.

Shards are independent (their content depends only on seed, config and index), so ranks
and resumed runs need no coordination beyond which indices they own: a shard is done when
both its tar and its record exist.

Beside ``dataset.json``, ``wids-index.json`` lists the same finished shards in the shard
index format of ``wids`` (webdataset's random-access reader), with URLs relative to the
directory, so ``wids.ShardListDataset("DIR/wids-index.json")`` reads the set as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

from iosd import __version__
from iosd.errors import UserError, name_path
from iosd.manifest import check_schema, write_json_atomic
from iosd.projection import PROJECTION_NAME
from iosd.schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_GLOB, shard_name

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
        self.out = Path(out)
        self.header = header  # manifest fields fixed by the config (identity, layout, ...)
        self.n_shards = n_shards
        self.overwrite = overwrite
        self.parts = self.out / PARTS_DIR

    # -- opening -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0: make the directory ours (new, resumed, or overwritten) and write a first manifest."""
        manifest_path = self.out / MANIFEST_NAME
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file", "choose a directory")
        if self.out.exists() and any(self.out.iterdir()):
            if not manifest_path.exists():
                raise UserError(f"--out {self.out} holds files that are not an iosd shard set", "choose a new or empty directory")
            try:
                old = check_schema(json.loads(manifest_path.read_text()), str(manifest_path))
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
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.parts.mkdir(exist_ok=True)
            probe = self.out / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise UserError(f"cannot write to --out {self.out} ({err.strerror})", "choose a writable directory") from None
        self.write_manifest()

    def _clear(self) -> None:
        """--overwrite: remove this set's own files only."""
        for tar in self.out.glob(SHARD_GLOB):
            tar.unlink()
        shutil.rmtree(self.parts, ignore_errors=True)
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        (self.out / WIDS_INDEX_NAME).unlink(missing_ok=True)
        (self.out / PROJECTION_NAME).unlink(missing_ok=True)  # --project writes its own after this

    def _finished(self) -> dict[int, dict]:
        """Records of the shards whose tar and record both exist and agree in size."""
        finished = {}
        for path in self.parts.glob("*.json"):
            index = int(path.stem.rsplit("-", 1)[1])
            try:
                record = json.loads(path.read_text())
                if (self.out / shard_name(index)).stat().st_size == record["bytes"]:
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
        final = self.out / name
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        count = 0
        try:
            with open(tmp, "wb", buffering=WRITE_BUFFER) as f:
                hashed = _HashingSink(f)
                with wds.TarWriter(hashed, encoder=False, mtime=0, user="iosd", group="iosd") as sink:
                    for sample in samples:
                        sink.write(sample)
                        count += 1
                f.flush()
                os.fsync(f.fileno())
            record = {"name": name, "index": index, "samples": count, "bytes": tmp.stat().st_size, "sha256": hashed.digest.hexdigest(), "stats": stats}
            os.replace(tmp, final)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            name_path(err, final)  # a full disk names the shard, not "[Errno 28]" alone
            raise
        write_json_atomic(self.parts / f"shard-{index:06d}.json", record)
        return record

    def records(self) -> list[dict]:
        finished = self._finished()
        return [finished[i] for i in sorted(finished)]

    def write_manifest(self) -> dict:
        """Rebuild dataset.json from the header and every finished shard's record."""
        recs = self.records()
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
        write_json_atomic(self.out / WIDS_INDEX_NAME, wids_index(recs, self.out.resolve().name))
        write_json_atomic(self.out / MANIFEST_NAME, manifest)
        return manifest
