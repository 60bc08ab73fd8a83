"""Shards -> padded training batches, decoded in DataLoader workers, with a resumable position.

Shards are read in an endless sequence: epoch ``e`` is a seeded permutation of the shard
list, and the sequence is dealt round-robin to every (rank, worker) slot, so slot ``s``
reads positions ``s, s + slots, s + 2 * slots, ...``. Every slot always has data (fewer
shards than ranks x workers just means a slot's shards come from later epochs), so DDP
ranks run the same number of steps and nothing waits on an empty worker. A slot's position
is (shards begun, samples read in the current one); each batch carries it, the trainer
keeps the last one it consumed per worker, and a resumed run starts every slot there.

Samples within a shard are read in order: iosd-gen draws every candidate independently, so
a shard is already a random sample; the epoch-wise shard permutation does the mixing.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from iosd.errors import UserError
from iosd.schema import REQUIRED_EXTS, decode_sample
from iosd.train.shards import ShardSet, open_stream

ON_CORRUPT = ("warn", "fail")


class ShardError(Exception):
    """A shard that cannot be read to its end (missing, truncated, not a tar)."""


class SampleError(Exception):
    """One sample that cannot be decoded or holds non-finite numbers."""


class LayoutError(Exception):
    """A sample whose features do not match the set's layout: never skipped."""


@dataclass(frozen=True)
class DecodeSpec:
    """What a worker needs to turn raw members into tensors."""

    layers: tuple[tuple[str, tuple[int, ...]], ...]
    embedding_dim: int
    min_score: float = 0.0
    subsets: tuple[str, ...] | None = ("seen",)  # classes whose masks train; None = every class
    mask_size: int | None = None  # training targets are area-resized to this side
    full_masks: bool = False  # validation keeps the masks at image resolution

    @classmethod
    def from_layout(cls, layout: dict, **options) -> DecodeSpec:
        layers = tuple((path, tuple(int(v) for v in shape)) for path, shape in layout["layers"])
        return cls(layers, int(layout["embedding_dim"]), **options)


def shard_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Raw samples (ext -> bytes) of one tar; a read problem raises ShardError naming it."""
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop reading this shard at its first problem

    try:
        stream = open_stream(url)
    except UserError:
        raise
    except Exception as err:
        raise ShardError(f"{url}: cannot open ({type(err).__name__}: {err})") from None
    count = 0
    with stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        for raw in wds.tariterators.group_by_keys(files, handler=handler):
            if errors:
                break  # the last, partial sample of a truncated tar
            count += 1
            yield raw
    if errors:
        err = errors[0]
        detail = str(err.args[0]) if err.args else type(err).__name__
        raise ShardError(f"{url}: {type(err).__name__}: {detail.split(' @ ')[0]}")
    if count == 0:
        raise ShardError(f"{url}: holds no sample")
    if expected is not None and count < expected:
        raise ShardError(f"{url}: {count} samples read, the manifest lists {expected} (truncated?)")


def decode_item(raw: dict, spec: DecodeSpec) -> dict | None:
    """Tensors of one sample, or None when none of its classes is a target here."""
    key = raw.get("__key__", "?")
    missing = [ext for ext in REQUIRED_EXTS if ext not in raw]
    if missing:
        raise SampleError(f"sample {key} lacks {', '.join(missing)}")
    paths = [path for path, _ in spec.layers]
    try:
        sample = decode_sample(raw, features=paths)
    except KeyError as err:
        if err.args and err.args[0] in paths:
            raise LayoutError(f"sample {key} has no feature layer {err.args[0]}") from None
        raise SampleError(f"sample {key} cannot be decoded (missing {err})") from None
    except Exception as err:
        raise SampleError(f"sample {key} cannot be decoded ({type(err).__name__}: {err})") from None
    targets = [(i, m) for i, m in sample.targets(spec.min_score) if spec.subsets is None or sample.classes[i].subset in spec.subsets]
    if not targets:
        return None
    features = {}
    for path, shape in spec.layers:
        array = sample.features[path]
        if tuple(array.shape) != shape:
            raise LayoutError(f"sample {key}: layer {path} is {list(array.shape)}, the set's layout says {list(shape)}")
        if not np.isfinite(array).all():
            raise SampleError(f"sample {key}: layer {path} holds NaN or infinite values")
        features[path] = torch.from_numpy(np.ascontiguousarray(array))
    rows = [i for i, _ in targets]
    embeddings = sample.embeddings[rows]
    if embeddings.ndim != 2 or embeddings.shape[1] != spec.embedding_dim:
        raise LayoutError(f"sample {key}: class embeddings are {embeddings.shape[-1]}-d, the set's layout says {spec.embedding_dim}")
    if not np.isfinite(embeddings).all():
        raise SampleError(f"sample {key}: class embeddings hold NaN or infinite values")
    masks = torch.from_numpy(np.stack([m for _, m in targets]).astype(np.float32))
    item = {"key": key, "features": features, "queries": torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)), "names": [sample.classes[i].name for i in rows], "subsets": [sample.classes[i].subset for i in rows]}
    if spec.full_masks:
        item["masks"] = masks.to(torch.uint8)
    if spec.mask_size is not None:
        size = (spec.mask_size, spec.mask_size)
        item["targets"] = masks if tuple(masks.shape[1:]) == size else F.interpolate(masks[None], size=size, mode="area")[0]
    return item


def collate(items: list[dict]) -> dict:
    """One batch: stacked features, queries padded per batch with a validity mask."""
    batch_size, width = len(items), max(len(it["names"]) for it in items)
    first = items[0]
    batch = {
        "features": {path: torch.stack([it["features"][path] for it in items]) for path in first["features"]},
        "queries": torch.zeros(batch_size, width, first["queries"].shape[1]),
        "query_mask": torch.zeros(batch_size, width, dtype=torch.bool),
        "names": [it["names"] for it in items],
        "subsets": [it["subsets"] for it in items],
        "keys": [it["key"] for it in items],
    }
    for name in ("targets", "masks"):
        if name in first:
            shape = first[name].shape[1:]
            if any(it[name].shape[1:] != shape for it in items):
                raise UserError(f"samples {first['key']} and others have {name} of different sizes", "use one image size per shard set")
            batch[name] = torch.zeros(batch_size, width, *shape, dtype=first[name].dtype)
    for b, it in enumerate(items):
        q = len(it["names"])
        batch["queries"][b, :q] = it["queries"]
        batch["query_mask"][b, :q] = True
        for name in ("targets", "masks"):
            if name in it:
                batch[name][b, :q] = it[name]
    return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Reader:
    """Shared by the training and validation streams: decoding with the corruption policy."""

    def __init__(self, shard_set: ShardSet, spec: DecodeSpec, batch_size: int, on_corrupt: str, rank: int, world: int) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise UserError(f"unknown --on-corrupt {on_corrupt!r}", f"use one of {', '.join(ON_CORRUPT)}")
        self.urls = list(shard_set.urls)
        self.expected = _expected_counts(shard_set)
        self.spec, self.batch_size, self.on_corrupt = spec, batch_size, on_corrupt
        self.rank, self.world = rank, world

    def _problem(self, message: str) -> dict | None:
        """A note for the trainer to print (warn), or an error batch that stops training (fail)."""
        if self.on_corrupt == "fail":
            return {"error": (f"corrupt input: {message}", "repair or remove it, or pass --on-corrupt warn to skip it")}
        return None

    def _read(self, url: str, start: int, notes: list[str], stats: Counter) -> Iterator[tuple[int, dict | None]]:
        """(index after this sample, item or None) for one shard, from sample ``start``."""
        try:
            for index, raw in enumerate(shard_samples(url, self.expected.get(url))):
                if index < start:
                    continue
                try:
                    item = decode_item(raw, self.spec)
                except SampleError as err:
                    stats["corrupt_samples"] += 1
                    error = self._problem(f"{url}: {err}")
                    if error:
                        yield index + 1, error
                        return
                    notes.append(f"skipped {url}: {err}")
                    yield index + 1, None
                    continue
                stats["used" if item is not None else "no_target"] += 1
                yield index + 1, item
        except ShardError as err:
            stats["corrupt_shards"] += 1
            error = self._problem(str(err))
            if error:
                yield start, error
                return
            notes.append(f"skipped the rest of corrupt shard {err}")
        except LayoutError as err:
            yield start, {"error": (f"{url}: {err}", "the shard set mixes feature layouts: regenerate it with one --layers")}


def _expected_counts(shard_set: ShardSet) -> dict[str, int]:
    """Samples per shard URL, when the manifest lists them (detects truncated tars)."""
    if not shard_set.manifest:
        return {}
    counts = {entry["name"]: int(entry.get("samples", 0)) for entry in shard_set.manifest.get("shards", [])}
    return {url: counts[name] for url in shard_set.urls if (name := url.replace("\\", "/").rsplit("/", 1)[-1]) in counts and counts[name] > 0}


class TrainStream(_Reader, IterableDataset):
    """The endless training batch stream of one rank (see the module docstring)."""

    def __init__(self, shard_set: ShardSet, spec: DecodeSpec, batch_size: int, *, seed: int = 0, on_corrupt: str = "warn", rank: int = 0, world: int = 1, start: dict | None = None, rotate: int = 0) -> None:
        super().__init__(shard_set, spec, batch_size, on_corrupt, rank, world)
        self.seed = seed
        self.start = start or {}
        # The DataLoader deals batches from workers 0, 1, ... in turn; a resumed run must go on
        # with the worker that was next, so physical worker w serves logical worker w + rotate.
        self.rotate = rotate
        self.barren_limit = 3 * len(self.urls) + 10

    def url_at(self, position: int) -> str:
        """The shard at global position ``position`` of the endless sequence."""
        epoch, index = divmod(position, len(self.urls))
        order = list(range(len(self.urls)))
        random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return self.urls[order[index]]

    def __iter__(self) -> Iterator[dict]:
        physical, workers = _worker()
        worker = (physical + self.rotate) % workers
        slot, slots = self.rank * workers + worker, self.world * workers
        shard, start = self.start.get(slot, (0, 0))
        items: list[dict] = []
        notes: list[str] = []
        stats: Counter = Counter()
        barren = 0
        while True:
            url = self.url_at(slot + shard * slots)
            used_before = stats["used"]
            for after, item in self._read(url, start, notes, stats):
                if item is not None and "error" in item:
                    yield item
                    return
                if item is not None:
                    items.append(item)
                if len(items) == self.batch_size:
                    batch = collate(items)
                    batch.update(worker=worker, position=(shard, after), notes=notes)
                    yield batch
                    items, notes = [], []
            shard, start = shard + 1, 0
            barren = 0 if stats["used"] > used_before else barren + 1
            if barren >= self.barren_limit:
                yield {"error": (f"no usable sample in the last {barren} shards read ({stats['corrupt_shards']} corrupt shards, {stats['corrupt_samples']} corrupt samples, {stats['no_target']} samples without a target{_score_hint(self.spec)})", "check the shards, or lower --min-score")}
                return


def _score_hint(spec: DecodeSpec) -> str:
    return f" at --min-score {spec.min_score}" if spec.min_score > 0 else ""


class ValStream(_Reader, IterableDataset):
    """Every validation shard once, dealt to the (rank, worker) slots; masks at full size."""

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        slot, slots = self.rank * workers + worker, self.world * workers
        items: list[dict] = []
        notes: list[str] = []
        stats: Counter = Counter()
        for url in self.urls[slot::slots]:
            for _, item in self._read(url, 0, notes, stats):
                if item is not None and "error" in item:
                    yield item
                    return
                if item is not None:
                    items.append(item)
                if len(items) == self.batch_size:
                    yield {**collate(items), "notes": notes}
                    items, notes = [], []
        if items or notes:
            yield {**(collate(items) if items else {"empty": True}), "notes": notes}


def start_positions(saved: dict | None, *, identity: str, rank: int, world: int, workers: int) -> tuple[dict[int, tuple[int, int]], int, str | None]:
    """Each slot's (shard, sample) to start from, this rank's first worker, and a note when the
    position is approximate."""
    if not saved:
        return {}, 0, None
    slots = world * max(workers, 1)
    old = [tuple(p) for p in saved["slots"]]
    if saved.get("identity") == identity and saved.get("slots_count", len(old)) == slots and len(old) == slots:
        next_worker = saved.get("next_worker") or [0] * world
        return {s: old[s] for s in range(slots)}, int(next_worker[rank]), None
    # Another geometry (or shard list): restart every slot at the earliest unfinished shard.
    old_slots = len(old)
    cursor = min(s + k * old_slots for s, (k, _) in enumerate(old)) if saved.get("identity") == identity else 0
    starts = {s: (max(0, math.ceil((cursor - s) / slots)), 0) for s in range(slots)}
    why = "a different number of ranks x workers" if saved.get("identity") == identity else "a different shard list"
    return starts, 0, f"resuming with {why}: data position restarts at shard {cursor} of the sequence (some samples may repeat)"


class TrainLoader:
    """The rank's batch iterator: workers decode, this side tracks what was consumed."""

    def __init__(self, stream: TrainStream, workers: int, *, pin_memory: bool = False, prefetch: int = 4) -> None:
        self.stream, self.workers = stream, max(0, workers)
        options = {"num_workers": self.workers, "batch_size": None, "pin_memory": pin_memory}
        if self.workers:
            options.update(prefetch_factor=prefetch, persistent_workers=False, multiprocessing_context=_mp_context(), worker_init_fn=_ignore_sigint)
        self.loader = DataLoader(stream, **options)
        self.iterator = iter(self.loader)
        n = max(self.workers, 1)
        base = stream.rank * n
        self.positions = [tuple(stream.start.get(base + w, (0, 0))) for w in range(n)]
        self.consumed = 0

    @property
    def next_worker(self) -> int:
        """The logical worker whose batch comes next (saved so a resume keeps the order)."""
        return (self.stream.rotate + self.consumed) % max(self.workers, 1)

    def next(self, note) -> dict:
        """The next batch; notes from workers go to ``note``; a worker's error becomes a UserError."""
        batch = next(self.iterator)
        if "error" in batch:
            raise UserError(*batch["error"])
        for message in batch.pop("notes", []):
            note(message)
        self.positions[batch.pop("worker")] = tuple(batch.pop("position"))
        self.consumed += 1
        return batch

    def close(self) -> None:
        del self.iterator


def val_batches(stream: ValStream, workers: int, note) -> Iterator[dict]:
    """The validation batches of this rank (a finite pass)."""
    options = {"num_workers": max(0, workers), "batch_size": None}
    if workers:
        options["multiprocessing_context"] = _mp_context()
    for batch in DataLoader(stream, **options):
        if "error" in batch:
            raise UserError(*batch["error"])
        for message in batch.pop("notes", []):
            note(message)
        if not batch.get("empty"):
            yield batch


def _ignore_sigint(_worker_id: int) -> None:
    """Ctrl-C is the trainer's to handle (it saves a checkpoint); workers just keep decoding."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mp_context():
    """fork where available (fast start); workers only read files and decode."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
