"""Check, summarise and preview a shard set against its ``dataset.json``.

Shards travel between machines (generated on a GPU box, trained on elsewhere), so
``verify`` reads every byte once: the sha256 and the tar/sample decode share one
sequential pass, and a truncated or damaged shard becomes a named problem, never a
crash. A set is read through ``iosd.store``: a local directory or an fsspec URL (s3://...)
takes the same path, each shard streamed once (never downloaded whole first). The functions
return plain results; ``iosd-shards`` only prints them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from iosd.errors import UserError
from iosd.manifest import read_manifest
from iosd.schema import (
    DECISIONS,
    EXT_META,
    KEPT,
    MANIFEST_NAME,
    REQUIRED_EXTS,
    SHARD_GLOB,
    Sample,
    decode_sample,
)
from iosd.store import LocalStore, Store, open_store

MISSING, CORRUPT, EXTRA, INCOMPLETE, MANIFEST = "missing", "corrupt", "extra", "incomplete", "manifest"
READ_BLOCK = 1 << 20

Progress = Callable[[int], None]


# ---------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One thing wrong with a shard set: which file, what kind, and why."""

    name: str
    kind: str  # MISSING, CORRUPT, EXTRA, INCOMPLETE or MANIFEST
    reason: str

    def line(self) -> str:
        return f"{self.kind.upper():<10} {self.name}: {self.reason}"


@dataclass
class VerifyReport:
    directory: str
    shards: int  # listed in the manifest
    samples: int  # decoded without error
    bytes: int  # read from disk or the object store
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class _HashingReader:
    """A read-only file wrapper that hashes and reports every byte ``tarfile`` pulls through it."""

    def __init__(self, f, progress: Progress | None) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.progress = progress
        self.read_bytes = 0
        self.data_end = 0  # the offset just past the last non-zero byte read

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha.update(data)
        if data and (tail := len(data.rstrip(b"\0"))):
            self.data_end = self.read_bytes + tail
        self.read_bytes += len(data)
        if self.progress is not None and data:
            self.progress(len(data))
        return data

    def drain(self) -> None:
        """Read what the tar reader left (end-of-archive padding, trailing garbage)."""
        while self.read(READ_BLOCK):
            pass


def _grouped_members(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, ext -> bytes) per sample of a streaming tar, keys split at the first dot."""
    current: str | None = None
    members: dict[str, bytes] = {}
    for info in tar:
        if not info.isfile():
            continue
        key, _, ext = info.name.partition(".")
        if current is not None and key != current:
            yield current, members
            members = {}
        current = key
        members[ext] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def _expected_layers(manifest: dict) -> dict[str, tuple[int, ...]] | None:
    layers = manifest.get("features", {}).get("layers")
    if not layers:
        return None
    return {entry["path"]: tuple(entry["shape"]) for entry in layers}


def _sample_problem(key: str, members: dict[str, bytes], layers: dict[str, tuple[int, ...]] | None) -> str | None:
    """Why one sample is unusable, or None when it decodes and agrees with the manifest."""
    missing = [ext for ext in REQUIRED_EXTS if ext not in members]
    if missing:
        return f"sample {key} lacks {', '.join(missing)}"
    try:
        sample = decode_sample(members, features=True)
    except Exception as err:  # damaged bytes fail in any decoder (PNG, zip, zarr, JSON)
        return f"sample {key} does not decode ({type(err).__name__}: {err})"
    return _inconsistency(sample, layers)


def _inconsistency(sample: Sample, layers: dict[str, tuple[int, ...]] | None) -> str | None:
    kept = [c for c in sample.classes if c.decision == KEPT and c.mask_index is not None]
    if len(sample.embeddings) != len(sample.classes):
        return f"sample {sample.key} has {len(sample.embeddings)} embeddings for {len(sample.classes)} classes"
    if len(sample.masks) != len(kept):
        return f"sample {sample.key} has {len(sample.masks)} masks for {len(kept)} kept classes"
    if len(kept) and sample.masks.shape[1:] != sample.image.shape[:2]:
        return f"sample {sample.key} masks are {sample.masks.shape[1:]} but the image is {sample.image.shape[:2]}"
    if layers is not None:
        got = {p: tuple(a.shape) for p, a in sample.features.items()}
        if got != layers:
            return f"sample {sample.key} feature layers {got} differ from the manifest's {layers}"
    return None


def check_shard(f, size: int, entry: dict, layers: dict[str, tuple[int, ...]] | None, progress: Progress | None = None) -> tuple[int, list[str]]:
    """(samples decoded, reasons the shard is corrupt) for one shard of ``size`` bytes, read
    once from the open binary stream ``f`` (a file, or an object streamed from a store)."""
    reasons: list[str] = []
    if size != entry.get("bytes"):
        what = "truncated" if isinstance(entry.get("bytes"), int) and size < entry["bytes"] else "wrong size"
        reasons.append(f"{what}: {size} bytes, manifest says {entry.get('bytes')}")
    good, bad, first_bad, end = 0, 0, None, None
    reader = _HashingReader(f, progress)
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for key, members in _grouped_members(tar):
                problem = _sample_problem(key, members, layers)
                if problem is None:
                    good += 1
                else:
                    bad += 1
                    first_bad = first_bad or problem
            end = tar.offset
    except UserError:  # the store failed (unreachable, dropped): one line, not a corrupt shard
        raise
    except Exception as err:  # tarfile raises several types on damage
        reasons.append(f"tar unreadable after {good + bad} samples ({type(err).__name__}: {err})")
    reader.drain()
    if end is not None and reader.data_end > end:  # all after the end-of-archive marker must be zero padding
        reasons.append(f"tar ends early at byte {end} of {size} (a damaged header hides the rest)")
    if first_bad:
        reasons.append(first_bad if bad == 1 else f"{bad} bad samples, first: {first_bad}")
    if reader.sha.hexdigest() != entry.get("sha256"):
        reasons.append("sha256 differs from the manifest")
    if good + bad != entry.get("samples"):
        reasons.append(f"{good + bad} samples, manifest says {entry.get('samples')}")
    return good, reasons


def _manifest_problems(manifest: dict, store: Store) -> list[Problem]:
    """Problems of the manifest itself: unfinished set, malformed or duplicate shard entries, extra tars."""
    problems = []
    shards = manifest.get("shards", [])
    if manifest.get("complete") is not True:
        planned = manifest.get("planned_shards", "?")
        problems.append(Problem(MANIFEST_NAME, INCOMPLETE, f"complete is not true ({len(shards)} of {planned} planned shards finished; rerun iosd-gen to resume)"))
    names = [s.get("name") for s in shards]
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(Problem(MANIFEST_NAME, MANIFEST, f"lists {name} {count} times"))
    written = manifest.get("counts", {}).get("written")
    listed = sum(int(s.get("samples") or 0) for s in shards)
    if isinstance(written, int) and written != listed:
        problems.append(Problem(MANIFEST_NAME, MANIFEST, f"counts.written is {written} but the shards list {listed} samples"))
    for tar in fnmatch.filter(store.names("", ".tar"), SHARD_GLOB):
        if tar not in names:
            problems.append(Problem(tar, EXTRA, f"present but not listed in {MANIFEST_NAME}"))
    return problems


def _valid_entry(entry) -> bool:
    name = entry.get("name") if isinstance(entry, dict) else None
    return isinstance(name, str) and bool(name) and Path(name).name == name


def _open_set(directory: str | Path) -> tuple[Store, str, dict]:
    """(store, the set as the user names it, manifest) of a directory or an fsspec URL."""
    store = open_store(directory)
    where = store.shown("")
    return store, where, read_manifest(where)


def _shard_sizes(store: Store, manifest: dict) -> dict[str, int]:
    """Sizes of the listed shards that exist (one listing for a URL)."""
    return store.sizes([e["name"] for e in manifest.get("shards", []) if _valid_entry(e)])


def bytes_to_read(directory: str | Path) -> int:
    """Total size of the listed shards that exist (the progress bar's total)."""
    store, _, manifest = _open_set(directory)
    return sum(_shard_sizes(store, manifest).values())


def verify_shards(directory: str | Path, progress: Progress | None = None) -> VerifyReport:
    """Every listed shard exists, matches its size and sha256, reads to the end, and every
    sample has all members, decodes (features included) and agrees with the manifest.
    ``directory``: a path or an fsspec URL; each shard is streamed once."""
    store, where, manifest = _open_set(directory)
    layers = _expected_layers(manifest)
    entries = manifest.get("shards", [])
    sizes = _shard_sizes(store, manifest)
    report = VerifyReport(where, len(entries), 0, 0)
    for entry in entries:
        if not _valid_entry(entry):
            report.problems.append(Problem(MANIFEST_NAME, MANIFEST, f"shard entry {entry!r} has no plain file name"))
            continue
        name = entry["name"]
        f = store.open(name) if name in sizes else None
        if f is None:
            report.problems.append(Problem(name, MISSING, "file not found"))
            continue
        with f:
            samples, reasons = check_shard(f, sizes[name], entry, layers, progress)
        report.samples += samples
        report.bytes += sizes[name]
        if reasons:
            report.problems.append(Problem(name, CORRUPT, "; ".join(reasons)))
    report.problems.extend(_manifest_problems(manifest, store))
    return report


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------
CONFIG_HIGHLIGHTS = ("source", "model", "steps", "guidance", "resolution", "layers", "feature_dtype", "codec", "seed", "objects", "teacher_config", "teacher_checkpoint", "score_thr", "mask_thr", "min_score")


def _open_shard(store: Store, where: str, name: str):
    """A listed shard opened for one streamed read; a missing one is a UserError naming it."""
    f = store.open(name)
    if f is None:
        raise UserError(f"{store.shown(name)} is missing", f"run iosd-shards verify {where}")
    return f


def _scan_class_counts(store: Store, where: str, manifest: dict) -> dict[str, dict[str, int]]:
    """Per-class decision counts read from every sample's JSON member (no image or feature decode)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for entry in manifest.get("shards", []):
        with _open_shard(store, where, entry["name"]) as f:
            try:
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for info in tar:
                        if info.isfile() and info.name.partition(".")[2] == EXT_META:
                            for record in json.loads(tar.extractfile(info).read())["classes"]:
                                counts[record["name"]][record["decision"]] += 1
            except (OSError, EOFError, tarfile.TarError, json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{store.shown(entry['name'])} is unreadable ({type(err).__name__}: {err})", f"run iosd-shards verify {where}") from None
    return {name: dict(c) for name, c in counts.items()}


def summarize(directory: str | Path, scan: bool = False) -> dict:
    """What a shard set holds, as JSON-ready data; class counts come from the manifest unless
    it lacks them or ``scan`` asks to read every sample's JSON. ``directory``: a path or an fsspec URL."""
    store, where, manifest = _open_set(directory)
    shards = manifest.get("shards", [])
    samples = sum(int(s.get("samples") or 0) for s in shards)
    total_bytes = sum(int(s.get("bytes") or 0) for s in shards)
    per_class = manifest.get("counts", {}).get("per_class")
    source = "manifest"
    if scan or not per_class:
        per_class, source = _scan_class_counts(store, where, manifest), "samples"
    classes = manifest.get("classes", {})
    subset_of = {n: "seen" for n in classes.get("seen", [])} | {n: "unseen" for n in classes.get("unseen", [])}
    feats = manifest.get("features", {})
    config = manifest.get("config", {})
    return {
        "directory": where,
        "schema_version": manifest.get("schema_version"),
        "iosd_version": manifest.get("iosd_version"),
        "complete": manifest.get("complete"),
        "masks_meaningful": manifest.get("masks_meaningful"),
        "shards": len(shards),
        "planned_shards": manifest.get("planned_shards"),
        "samples": samples,
        "bytes": total_bytes,
        "bytes_per_sample": round(total_bytes / samples) if samples else None,
        "image_size": manifest.get("image_size"),
        "classes": {"name": classes.get("name"), "split": classes.get("split"), "seen": classes.get("seen", []), "unseen": classes.get("unseen", [])},
        "subset": manifest.get("subset"),
        "per_class": {name: {"subset": subset_of.get(name, "unknown"), **{d: int(per_class[name].get(d, 0)) for d in DECISIONS}} for name in sorted(per_class)},
        "per_class_source": source,
        "features": {
            "layers": [{"path": e.get("path"), "shape": e.get("shape")} for e in feats.get("layers", [])],
            "dtype": feats.get("dtype"),
            "codec": feats.get("codec"),
            "raw_bytes_per_sample": feats.get("raw_bytes_per_sample", feats.get("bytes_per_sample")),
            "stored_bytes_per_sample": feats.get("stored_bytes_per_sample"),
        },
        "embedding": manifest.get("embedding"),
        "teacher": manifest.get("teacher"),
        "config": {k: config[k] for k in CONFIG_HIGHLIGHTS if k in config},
        "notes": manifest.get("notes", []),
    }


# ---------------------------------------------------------------------------------------
# show
# ---------------------------------------------------------------------------------------
def _first_samples(store: Store, where: str, manifest: dict, n: int) -> list[Sample]:
    out: list[Sample] = []
    for entry in manifest.get("shards", []):
        if len(out) >= n:
            break
        with _open_shard(store, where, entry["name"]) as f:
            try:
                with tarfile.open(fileobj=f, mode="r|") as tar:
                    for _, members in _grouped_members(tar):
                        out.append(decode_sample(members, features=False))
                        if len(out) >= n:
                            break
            except UserError:  # the store failed: its own line
                raise
            except Exception as err:  # any damage: point at verify
                raise UserError(f"{store.shown(entry['name'])} is unreadable ({type(err).__name__}: {err})", f"run iosd-shards verify {where}") from None
    if not out:
        raise UserError(f"{where} holds no samples", "generate some with iosd-gen first")
    return out


def first_samples(directory: str | Path, n: int) -> list[Sample]:
    """The first ``n`` samples in manifest order (features not decoded), streamed from a
    directory or an fsspec URL (only as far as the ``n``-th sample)."""
    store, where, manifest = _open_set(directory)
    return _first_samples(store, where, manifest, n)


def sample_title(sample: Sample) -> str:
    """Kept classes with their scores; rejected ones in brackets with the reason."""
    parts = []
    for c in sample.classes:
        parts.append(f"{c.name} {c.score:.2f}" if c.decision == KEPT else f"[{c.name} {c.score:.2f} {c.decision}]")
    return ", ".join(parts)


def preview(directory: str | Path, n: int = 16, out: str | Path | None = None, ncols: int = 4) -> Path:
    """A PNG grid of the first ``n`` samples with their masks overlaid; returns its path. The
    PNG is written locally: ``out``, else DIRECTORY/preview.png for a directory and
    ./NAME-preview.png for a URL (a set NAME in an object store)."""
    from iosd.viz import grid, overlay, save_png_atomic

    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})", "pass --n 16")
    store, where, manifest = _open_set(directory)
    samples = _first_samples(store, where, manifest, n)
    tiles = []
    for sample in samples:
        labels = [""] * len(sample.masks)
        for c in sample.classes:
            if c.decision == KEPT and c.mask_index is not None and c.mask_index < len(labels):
                labels[c.mask_index] = c.name
        masks = sample.masks if len(sample.masks) else np.zeros((0, *sample.image.shape[:2]), np.uint8)
        tiles.append(overlay(sample.image, masks, labels or None, alpha=0.4))
    if out is None:
        out = store.root / "preview.png" if isinstance(store, LocalStore) else Path(f"{store.name}-preview.png")
    target = Path(out)
    return save_png_atomic(grid(tiles, [sample_title(s) for s in samples], ncols=ncols), target)
