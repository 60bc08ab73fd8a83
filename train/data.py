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

Features move at the speed of memory: a worker reads ``feat.zarr.zip`` by the lean path of
``iosd.featstore.read_stored`` (views of the tar member's bytes, trusting the manifest's
layout and dtype, refusing anything else), checks finiteness on the stored bits, never
decodes the PNG, and stacks each batch straight into shared memory in the stored dtype
(float16, bfloat16, int8 or fp8 bits, plus float32 per-channel scales). The trainer
dequantises on the device (``to_device_features``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import posixpath
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from iosd.errors import UserError
from iosd.featstore import SCALED, FeatureLayoutError, all_finite, copy_finite, read_stored
from iosd.npy import read_npy, read_npz
from iosd.schema import EXT_EMB, EXT_FEAT, EXT_IMAGE, EXT_MASKS, EXT_META, KEPT, REQUIRED_EXTS
from iosd.train.shards import ShardSet, is_url, open_stream
from iosd.train.tarscan import members as tar_members

ON_CORRUPT = ("warn", "fail")


class ShardError(Exception):
    """A shard that cannot be read to its end (missing, truncated, not a tar)."""


class DamagedShard(UserError):
    """--on-corrupt fail met a shard it cannot read: ``fix`` says how to repair the set; the
    trainer adds how to go on (--resume once a checkpoint is saved)."""


SKIP_HINT = "or pass --on-corrupt warn to skip it"


def shard_fix(url: str) -> str:
    """How to repair the set of a shard that is missing or damaged."""
    where = posixpath.dirname(url) if is_url(url) else os.path.dirname(url) or "."
    return f"check the set with iosd-shards verify {where}, restore the shard or delete it and rerun the iosd-gen command that wrote the set (it regenerates exactly the missing shards)"


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
    dtype: str | None = None  # the stored feature dtype the manifest states (None: each sample's own)

    @classmethod
    def from_layout(cls, layout: dict, **options) -> DecodeSpec:
        layers = tuple((path, tuple(int(v) for v in shape)) for path, shape in layout["layers"])
        return cls(layers, int(layout["embedding_dim"]), **options)

    @classmethod
    def for_shards(cls, shard_set: ShardSet, **options) -> DecodeSpec:
        """The layout and stored dtype of a shard set, from its manifest where it has one."""
        dtype = ((shard_set.manifest or {}).get("features") or {}).get("dtype")
        return cls.from_layout(shard_set.layout, dtype=dtype, **options)


def shard_samples(url: str, expected: int | None = None) -> Iterator[dict]:
    """Raw samples (ext -> bytes) of one tar; a read problem raises ShardError naming it.

    A local tar is mapped into memory and its feature and image members come back as views
    of the mapping (``memoryview``, no copy); other members, and tars read by URL, as bytes."""
    local = _local_path(url)
    samples = _mapped_samples(url, local) if local is not None else _streamed_samples(url)
    count = 0
    for raw in samples:
        count += 1
        yield raw
    if count == 0:
        raise ShardError(f"{url}: holds no sample")
    if expected is not None and count < expected:
        raise ShardError(f"{url}: {count} samples read, the manifest lists {expected} (truncated?)")


def _local_path(url: str) -> str | None:
    if not is_url(url):
        return url
    return url[len("file://"):] if url.startswith("file://") else None


def _streamed_samples(url: str) -> Iterator[dict]:
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
    with stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        for raw in wds.tariterators.group_by_keys(files, handler=handler):
            if errors:
                break  # the last, partial sample of a truncated tar
            yield raw
    if errors:
        err = errors[0]
        detail = str(err.args[0]) if err.args else type(err).__name__
        raise ShardError(f"{url}: {type(err).__name__}: {detail.split(' @ ')[0]}")


def _mapped_samples(url: str, path: str) -> Iterator[dict]:
    """Samples of a local tar, members grouped by key as webdataset does (the key is the
    name up to the first dot of its base name); a partial last sample is never yielded.

    Once the consumer asks for the next sample, the last one's pages leave this process
    (``MADV_DONTNEED``: they stay in the page cache): a worker's resident memory holds one
    sample of its shard, not every page of it read so far."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ShardError(f"{url}: missing (removed after the run began?)") from None
    except OSError as err:
        raise ShardError(f"{url}: cannot open ({type(err).__name__}: {err})") from None
    current: dict | None = None
    mapping, span = None, [0, 0]
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            if not size:
                raise tarfile.ReadError("empty file")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(mapping)
            for info in _checked(tar_members(view, f), f, size):
                if not info.isfile:
                    continue
                end = info.offset_data + info.size
                if end > size:
                    raise tarfile.ReadError(f"member {info.name} runs past the end of the file (truncated)")
                prefix, suffix = wds.tariterators.base_plus_ext(info.name)
                if prefix is None:
                    continue
                suffix = suffix.lower()
                if current is None or prefix != current["__key__"]:
                    if current is not None:
                        yield current
                        _drop_pages(mapping, *span)
                    current, span = {"__key__": prefix, "__url__": url}, [info.offset, end]
                if suffix in current:
                    raise tarfile.ReadError(f"duplicate file name {info.name}")
                _same_size(f, size)  # the member's pages are about to be read (below, or by the consumer)
                data = view[info.offset_data : end]
                current[suffix] = data if suffix in _VIEWED else bytes(data)
                span[1] = end
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            raise ShardError(f"{url}: {type(err).__name__}: {err}") from None
    if current is not None:
        yield current
        _drop_pages(mapping, *span)


def _same_size(f, size: int) -> None:
    """``tarfile.ReadError`` once the mapped file is shorter than when it was mapped: truncated
    while training reads it. Checked before mapped pages are read, since touching one past the
    new end of the file is SIGBUS (the process dies, no exception); an ``fstat``, ~1 us."""
    now = os.fstat(f.fileno()).st_size
    if now < size:
        raise tarfile.ReadError(f"the file shrank from {size} to {now} bytes while being read (truncated)")


def _checked(found: Iterator, f, size: int) -> Iterator:
    """The members ``found``, the file's size checked before each next header is read."""
    while True:
        _same_size(f, size)
        try:
            yield next(found)
        except StopIteration:
            return


_VIEWED = (EXT_FEAT, EXT_IMAGE)  # the large members stay views of the mapping (training never decodes the image)


def _drop_pages(mapping: mmap.mmap | None, start: int, end: int) -> None:
    """Unmap [start, end) of a read-only shard mapping from this process (the data stays
    valid: a later read faults it in again from the page cache)."""
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start -= start % mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


def decode_item(raw: dict, spec: DecodeSpec, check_finite: bool = True) -> dict | None:
    """Tensors of one sample, or None when none of its classes is a target here.

    Features stay in their stored dtype (``item["features"]``: NumPy arrays, views of the raw
    member where uncompressed; ``item["scales"]`` for int8 / fp8); the image is not decoded.
    ``check_finite`` False leaves the features' finite check to the batch they are copied into."""
    key = raw.get("__key__", "?")
    missing = [ext for ext in REQUIRED_EXTS if ext not in raw]
    if missing:
        raise SampleError(f"sample {key} lacks {', '.join(missing)}")
    try:
        classes = json.loads(raw[EXT_META])["classes"]
        rows = [
            i for i, c in enumerate(classes)
            if c["decision"] == KEPT and c["mask_index"] is not None and c["score"] >= spec.min_score and (spec.subsets is None or c["subset"] in spec.subsets)
        ]
    except Exception as err:
        raise SampleError(f"sample {key} cannot be decoded (its json: {type(err).__name__}: {err})") from None
    if not rows:
        return None
    try:
        stored = read_stored(raw[EXT_FEAT], spec.layers, spec.dtype)
    except FeatureLayoutError as err:
        raise LayoutError(f"sample {key}: {err}") from None
    except Exception as err:
        raise SampleError(f"sample {key} cannot be decoded ({EXT_FEAT}: {type(err).__name__}: {err})") from None
    for path, array in stored.arrays.items() if check_finite else ():
        if not all_finite(array, stored.dtype):
            raise SampleError(f"sample {key}: layer {path} holds NaN or infinite values")
        scale = stored.scales.get(path)
        if scale is not None and not np.isfinite(scale).all():
            raise SampleError(f"sample {key}: layer {path} has NaN or infinite scales")
    try:
        embeddings = read_npy(raw[EXT_EMB])
        all_masks = read_npz(raw[EXT_MASKS], "masks")
        masks = all_masks[[classes[i]["mask_index"] for i in rows]]
        embeddings = embeddings[rows]
    except Exception as err:
        raise SampleError(f"sample {key} cannot be decoded ({type(err).__name__}: {err})") from None
    if embeddings.ndim != 2 or embeddings.shape[1] != spec.embedding_dim:
        raise LayoutError(f"sample {key}: class embeddings are {embeddings.shape[-1]}-d, the set's layout says {spec.embedding_dim}")
    if not np.isfinite(embeddings).all():
        raise SampleError(f"sample {key}: class embeddings hold NaN or infinite values")
    item = {
        "key": key,
        "features": stored.arrays,
        "scales": stored.scales,
        "feature_dtype": stored.dtype,
        "queries": torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)),
        "names": [classes[i]["name"] for i in rows],
        "subsets": [classes[i]["subset"] for i in rows],
    }
    masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))
    if spec.full_masks:
        item["masks"] = masks
    if spec.mask_size is not None:
        size = (spec.mask_size, spec.mask_size)
        # 0/1 at the mask's own size stay uint8 (the device makes them float); resized ones are area fractions
        item["targets"] = masks if tuple(masks.shape[1:]) == size else F.interpolate(masks[None].float(), size=size, mode="area")[0]
    return item


_ALIGN = 64  # bytes: where each array of a batch starts in its storage
POOL_SLOTS = 16  # small-part buffers per worker: prefetched or in use, slack
PREFETCH = 1  # batches in flight per worker (TrainLoader): what bounds the loader's memory


def _new_storage(nbytes: int) -> torch.UntypedStorage:
    """In a DataLoader worker, shared memory: sending the batch to the main process then
    copies nothing (as torch's default_collate does)."""
    return torch.UntypedStorage._new_shared(nbytes) if get_worker_info() is not None else torch.UntypedStorage(nbytes)


class BufferPool:
    """The shared-memory batch buffers of one worker, filled again once the main process has
    let them go: fresh shared memory costs a page fault per 4 KiB, several times the copy.

    ``board`` is this worker's row of a shared int8 table made by TrainLoader: 1 while the
    main process may use a slot's buffer, 0 once TrainLoader released it (at its next
    ``next()``). With no free slot a batch gets a fresh buffer: nothing waits, nothing is
    overwritten while in use."""

    def __init__(self, board: torch.Tensor | None = None, worker: int = 0) -> None:
        self.board, self.worker = board, worker
        self.held: dict[int, tuple[tuple, torch.UntypedStorage]] = {}

    def storage(self, signature: tuple, nbytes: int) -> tuple[torch.UntypedStorage, tuple[int, int] | None]:
        if self.board is not None:
            free = [slot for slot in range(len(self.board)) if int(self.board[slot]) == 0]
            if free:
                # a free buffer of this shape first, then an unused slot, then any free one
                # (features and a batch's small parts alternate: first-free would swap them)
                rank = lambda s: 0 if self.held.get(s, (None,))[0] == signature else 1 if s not in self.held else 2  # noqa: E731
                slot = min(free, key=lambda s: (rank(s), s))
                held = self.held.get(slot)
                if held is None or held[0] != signature:
                    held = self.held[slot] = (signature, _new_storage(nbytes))
                self.board[slot] = 1
                return held[1], (self.worker, slot)
        return _new_storage(nbytes), None


def _plan(shapes: dict) -> tuple[list[tuple], int]:
    """(name, shape, NumPy dtype, byte offset) of each array laid out in one buffer, and its size."""
    plan, offset = [], 0
    for name, (shape, dtype) in shapes.items():
        offset = -(-offset // _ALIGN) * _ALIGN
        plan.append((name, tuple(shape), np.dtype(dtype), offset))
        offset += math.prod(shape) * np.dtype(dtype).itemsize
    return plan, offset


def _views(storage: torch.UntypedStorage, plan: list[tuple], base: int = 0) -> dict:
    """Tensors of a plan, views of ``storage`` from byte ``base`` on."""
    out = {}
    for name, shape, dtype, start in plan:
        like = torch.from_numpy(np.empty(0, dtype))
        out[name] = like.new_empty(0).set_(storage, (base + start) // dtype.itemsize, shape)
    return out


def _pooled(shapes: dict, pool: BufferPool | None) -> tuple[dict, tuple[int, int] | None]:
    """Tensors of the given (shape, NumPy dtype), views of one storage from ``pool``."""
    plan, size = _plan(shapes)
    signature = tuple((name, shape, dtype.str) for name, shape, dtype, _ in plan)
    storage, buffer = (pool or BufferPool()).storage(signature, max(size, 1))
    return _views(storage, plan), buffer


def feature_shapes(layers, dtype: str, batch_size: int) -> dict:
    """(group, path) -> ((B, ...), NumPy dtype) of a batch's stored features and scales."""
    from iosd.featstore import STORED_DTYPES

    shapes = {("features", path): ((batch_size, *shape), STORED_DTYPES[dtype]) for path, shape in layers}
    if dtype in SCALED:
        shapes.update({("scales", path): ((batch_size, shape[0]), np.dtype("<f4")) for path, shape in layers})
    return shapes


TAIL_QUERIES = 4  # classes per sample the arena's tail room holds; batches with more use the pool


def tail_room(stream: TrainStream) -> int:
    """Bytes of a batch's small parts at up to TAIL_QUERIES classes per sample: queries, their
    mask and the targets (uint8 at the image's own size, float32 area fractions otherwise)."""
    spec, per_query = stream.spec, 4 * stream.spec.embedding_dim + 1
    if spec.mask_size is not None:
        per_query += spec.mask_size**2 * (1 if stream.image_side == spec.mask_size else 4)
    return stream.batch_size * TAIL_QUERIES * per_query + 4 * _ALIGN


class BatchArena:
    """Every feature batch of a training run lives in one of (workers + 1) slots of a single
    shared-memory buffer, made by the main process before its workers start: a worker claims
    a free slot (under a lock: any worker may take any slot), fills it and sends only the slot
    number; the main process reads its own mapping of the same memory (no file descriptor
    passes, no page is mapped again) and frees the slot when it asks for the next batch.
    With one batch in flight per worker that bounds the loader's memory by construction:
    workers + 1 slots are ever in use, so resident memory stays within (workers + 2) x batch
    bytes (the last one for the sample each worker is decoding). A slot also has room for
    its batch's small parts (queries, targets), so a batch crosses processes as a slot number
    alone (no shared-memory handle to pass, which cost 5-8 ms a batch). On CUDA
    the buffer is page-locked once (``cudaHostRegister``), so batches come back pinned
    without a copy; a slot is then freed only after its copy to the device finished."""

    def __init__(self, slots: int, slot_bytes: int, shared: bool, tail_bytes: int = 0) -> None:
        import multiprocessing

        # each slot: the feature batch, then room for its small parts (queries, targets): pages
        # never written are never resident, so unused room costs address space, not memory
        # (once page-locked on CUDA it is resident: 3-7% of a slot for the recipes)
        self.tail_offset = -(-slot_bytes // _ALIGN) * _ALIGN
        self.slots, self.slot_bytes = slots, self.tail_offset + -(-tail_bytes // _ALIGN) * _ALIGN
        nbytes = max(1, slots * self.slot_bytes)
        self.storage = torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)
        self.board = torch.zeros(slots, dtype=torch.int8)
        if shared:
            self.board.share_memory_()
        self.lock = (_mp_context() or multiprocessing).Lock() if shared else _NoLock()

    def claim(self) -> int | None:
        """A free slot, now taken; None when every slot is in use (the caller falls back)."""
        with self.lock:
            free = (self.board == 0).nonzero()
            if not len(free):
                return None
            slot = int(free[0])
            self.board[slot] = 1
            return slot

    def release(self, slot: int) -> None:
        with self.lock:
            self.board[slot] = 0

    def views(self, slot: int, plan: list[tuple]) -> dict:
        return _views(self.storage, plan, slot * self.slot_bytes)

    def tail_plan(self, shapes: dict) -> list[tuple] | None:
        """The plan of a batch's small parts in a slot's tail room, or None when they do not fit."""
        plan, size = _plan(shapes)
        if self.tail_offset + size > self.slot_bytes:
            return None
        return [(name, shape, dtype, self.tail_offset + start) for name, shape, dtype, start in plan]

    def pin(self) -> bool:
        """Page-lock the buffer for CUDA copies; False where that is not possible."""
        try:
            err = torch.cuda.cudart().cudaHostRegister(self.storage.data_ptr(), self.storage.nbytes(), 0)
        except Exception:  # no CUDA runtime, or a build without it
            return False
        return int(err) == 0


def _received(plan: list) -> list[tuple]:
    """A plan as it crossed processes (the DataLoader hands tuples over as lists), as _plan made it."""
    return [(tuple(name) if isinstance(name, list) else name, tuple(shape), np.dtype(dtype), int(offset)) for name, shape, dtype, offset in plan]


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class BatchBuilder:
    """A batch filled as its samples are decoded: each sample's stored features are copied
    into the batch's buffer (from the pool) and checked for finite values there, in one pass
    over memory (the copy reads the mapped shard, the check reads the cache)."""

    def __init__(self, batch_size: int, pool: BufferPool | None = None, arena: BatchArena | None = None) -> None:
        self.batch_size, self.pool, self.arena = batch_size, pool, arena
        self._reset()

    def _reset(self) -> None:
        self.items: list[dict] = []
        self.arrays: dict[tuple[str, str], torch.Tensor] | None = None
        self.buffer: tuple[int, int] | None = None
        self.slot: tuple[int, list[tuple]] | None = None  # (arena slot, plan) holding the features
        self.dtype: str | None = None

    def __len__(self) -> int:
        return len(self.items)

    def _allocate(self, item: dict) -> None:
        shapes = {(group, path): ((self.batch_size, *a.shape), a.dtype) for group in ("features", "scales") for path, a in item[group].items()}
        self.dtype = item["feature_dtype"]
        if self.arena is not None:
            plan, size = _plan(shapes)
            slot = self.arena.claim() if size <= self.arena.slot_bytes else None
            if slot is not None:
                self.arrays, self.slot = self.arena.views(slot, plan), (slot, plan)
                return
        self.arrays, self.buffer = _pooled(shapes, self.pool)

    def add(self, item: dict) -> None:
        """Copy one decoded item in; SampleError (nothing added) when it holds NaN or infinity."""
        if self.arrays is None:
            self._allocate(item)
        elif item["feature_dtype"] != self.dtype:
            raise LayoutError(f"sample {item['key']} stores features as {item['feature_dtype']}, the samples before it as {self.dtype}")
        b = len(self.items)
        for group in ("features", "scales"):
            for path, src in item[group].items():
                dst = self.arrays.get((group, path))
                if dst is None or tuple(dst.shape[1:]) != src.shape:
                    raise LayoutError(f"sample {item['key']}: {group} of layer {path} do not match the batch's")
                if group == "features" and not copy_finite(dst[b].numpy(), src, self.dtype):
                    raise SampleError(f"sample {item['key']}: layer {path} holds NaN or infinite values")
                if group == "scales" and not copy_finite(dst[b].numpy(), src, "float32"):
                    raise SampleError(f"sample {item['key']}: layer {path} has NaN or infinite scales")
        self.items.append({k: v for k, v in item.items() if k not in ("features", "scales")})

    def take(self) -> dict:
        """The batch of the items added so far (features as views of the buffer); starts anew."""
        items, arrays, buffer, dtype, slot = self.items, self.arrays or {}, self.buffer, self.dtype, self.slot
        self._reset()
        n = len(items)
        features = {path: t[:n] for (group, path), t in arrays.items() if group == "features"}
        if dtype == "bfloat16":
            features = {path: t.view(torch.bfloat16) for path, t in features.items()}
        width = max(len(it["names"]) for it in items)
        first = items[0]
        # the small parts share one pooled buffer too: one shared-memory handle per batch part
        tail = {"queries": ((n, width, first["queries"].shape[1]), np.dtype(np.float32)), "query_mask": ((n, width), np.dtype(bool))}
        for name in ("targets", "masks"):
            if name in first:
                shape = tuple(first[name].shape[1:])
                if any(tuple(it[name].shape[1:]) != shape for it in items):
                    raise UserError(f"samples {first['key']} and others have {name} of different sizes", "use one image size per shard set")
                tail[name] = ((n, width, *shape), torch.empty(0, dtype=first[name].dtype).numpy().dtype)
        tail_plan = self.arena.tail_plan(tail) if slot is not None else None
        if tail_plan is not None:  # in the features' slot: the batch crosses processes as a slot number
            small, tail_buffer = self.arena.views(slot[0], tail_plan), None
        else:
            small, tail_buffer = _pooled(tail, self.pool)
        for tensor in small.values():
            tensor.zero_()
        batch = {
            "features": features,
            "scales": {path: t[:n] for (group, path), t in arrays.items() if group == "scales"},
            "feature_dtype": dtype,
            "buffer": [b for b in (buffer, tail_buffer) if b is not None],
            **small,
            "names": [it["names"] for it in items],
            "subsets": [it["subsets"] for it in items],
            "keys": [it["key"] for it in items],
        }
        for b, it in enumerate(items):
            q = len(it["names"])
            batch["queries"][b, :q] = it["queries"]
            batch["query_mask"][b, :q] = True
            for name in ("targets", "masks"):
                if name in it:
                    batch[name][b, :q] = it[name]
        if slot is not None:  # the features travel as their arena slot: the receiver has the memory
            batch.update(features={}, scales={}, arena=(slot[0], slot[1], n, tail_plan))
            if tail_plan is not None:
                for name in tail:
                    del batch[name]
        return batch


def collate(items: list[dict], pool: BufferPool | None = None) -> dict:
    """One batch of decoded items: stacked features (stored dtype) and scales, queries padded
    per batch with a validity mask. ``batch["buffer"]``: the pool slot holding the features."""
    builder = BatchBuilder(len(items), pool)
    for item in items:
        builder.add(item)
    return builder.take()


def dequantize_tensor(x: torch.Tensor, dtype: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of a batch of stored features (B, C, ...), on whatever device ``x`` is:
    the same numbers as ``iosd.featstore.dequantize``."""
    if dtype == "fp8":
        from iosd.featstore import E4M3_TABLE

        if x.device.type == "cpu":  # a table lookup: 3x torch's float8 cast on the CPU (measured)
            x = torch.from_numpy(np.take(E4M3_TABLE, x.view(torch.uint8).numpy()))
        elif hasattr(torch, "float8_e4m3fn"):
            x = x.view(torch.float8_e4m3fn).float()
        else:
            x = torch.from_numpy(E4M3_TABLE).to(x.device)[x.long()]
    elif dtype == "bfloat16" and x.dtype != torch.bfloat16:
        x = x.view(torch.bfloat16).float()
    else:
        x = x.float()
    if dtype in SCALED:
        x = x * scale.reshape(*scale.shape, *([1] * (x.dim() - scale.dim())))
    return x


def to_device_features(batch: dict, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A batch's features moved to ``device`` in their stored dtype, then dequantised there
    to float32 (a batch without ``feature_dtype`` is already float32)."""
    dtype = batch.get("feature_dtype", "float32")
    scales = batch.get("scales") or {}
    out = {}
    for path, x in batch["features"].items():
        x = x.to(device, non_blocking=True)
        scale = scales.get(path)
        if scale is not None:
            scale = scale.to(device, non_blocking=True)
        out[path] = x if dtype == "float32" else dequantize_tensor(x, dtype, scale)
    return out


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
        self.image_side = ((shard_set.manifest or {}).get("image_size") or [None])[0]

    def _problem(self, message: str, shard: str | None = None) -> dict | None:
        """A note for the trainer to print (warn), or an error batch that stops training (fail);
        ``shard``: the shard itself cannot be read (its fix repairs the set)."""
        if self.on_corrupt != "fail":
            return None
        if shard is not None:
            return {"error": (f"unreadable shard {message}", shard_fix(shard)), "shard": shard}
        return {"error": (f"corrupt input: {message}", f"repair or remove it, {SKIP_HINT}")}

    def _read(self, url: str, start: int, notes: list[str], stats: Counter, builder: BatchBuilder) -> Iterator[tuple[int, dict | None]]:
        """(index after this sample, item or None) for one shard, from sample ``start``; each
        item is added to ``builder`` (where its features are checked for finite values)."""
        try:
            for index, raw in enumerate(shard_samples(url, self.expected.get(url))):
                if index < start:
                    continue
                try:
                    item = decode_item(raw, self.spec, check_finite=False)
                    if item is not None:
                        if self.spec.dtype is None:
                            self.spec = replace(self.spec, dtype=item["feature_dtype"])  # one dtype per set
                        builder.add(item)
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
            error = self._problem(str(err), url)
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
        self.board: torch.Tensor | None = None  # shared buffer-slot table, set by TrainLoader
        self.arena: BatchArena | None = None  # the feature batches' memory, set by TrainLoader

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
        pool = BufferPool(self.board[physical] if self.board is not None else None, physical)
        shard, start = self.start.get(slot, (0, 0))
        builder = BatchBuilder(self.batch_size, pool, self.arena)
        notes: list[str] = []
        stats: Counter = Counter()
        barren = 0
        while True:
            url = self.url_at(slot + shard * slots)
            used_before = stats["used"]
            for after, item in self._read(url, start, notes, stats, builder):
                if item is not None and "error" in item:
                    yield item
                    return
                if len(builder) == self.batch_size:
                    batch = builder.take()
                    batch.update(worker=worker, position=(shard, after), notes=notes)
                    yield batch
                    notes = []
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
        builder = BatchBuilder(self.batch_size)
        notes: list[str] = []
        stats: Counter = Counter()
        for url in self.urls[slot::slots]:
            for _, item in self._read(url, 0, notes, stats, builder):
                if item is not None and "error" in item:
                    yield item
                    return
                if len(builder) == self.batch_size:
                    yield {**_float_batch(builder.take()), "notes": notes}
                    notes = []
        if len(builder) or notes:
            yield {**(_float_batch(builder.take()) if len(builder) else {"empty": True}), "notes": notes}


def _float_batch(batch: dict) -> dict:
    """Validation batches carry float32 features (its pass moves them to the device as they are)."""
    return {**batch, "features": to_device_features(batch, "cpu"), "scales": {}, "feature_dtype": "float32", "buffer": []}


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
    """The rank's batch iterator: workers decode, this side tracks what was consumed.

    A batch's feature tensors are valid until the next call to ``next()``: workers then fill
    their buffers again (copy them, e.g. to the device, before asking for the next batch;
    the trainer's ``_to_device`` does, then calls ``copied()``). Each worker has one batch in
    flight (``prefetch`` 1) and the batch in use here is let go before the next is fetched:
    workers + 1 feature batches exist at any time, in a ``BatchArena`` of workers + 1 slots."""

    def __init__(self, stream: TrainStream, workers: int, *, pin_memory: bool = False, prefetch: int = PREFETCH) -> None:
        self.stream, self.workers = stream, max(0, workers)
        options = {"num_workers": self.workers, "batch_size": None, "pin_memory": pin_memory}
        # which small-part buffers the main process still uses (see BufferPool); made before the workers start
        self.board = torch.zeros(max(self.workers, 1), max(POOL_SLOTS, 2 * (prefetch + 3)), dtype=torch.int8)
        if self.workers:
            options.update(prefetch_factor=prefetch, persistent_workers=False, multiprocessing_context=_mp_context(), worker_init_fn=_ignore_sigint)
            self.board.share_memory_()
        stream.board = self.board
        self.arena = None
        if stream.spec.dtype is not None:  # the layout is known: every feature batch has one size
            _, size = _plan(feature_shapes(stream.spec.layers, stream.spec.dtype, stream.batch_size))
            self.arena = BatchArena(self.workers * prefetch + 1, size, shared=self.workers > 0, tail_bytes=tail_room(stream))
        stream.arena = self.arena
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.registered = self.pin_memory and self.arena is not None and self.arena.pin()
        self.event = None  # CUDA event after the batch in use was copied to the device
        self.slot: int | None = None  # the arena slot of the batch in use
        self.in_use: list[tuple[int, int]] = []
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
        self._release()  # first: the worker given the next task may refill that slot at once
        batch = next(self.iterator)
        self.in_use = batch.pop("buffer", None) or []
        if "arena" in batch:
            self._from_arena(batch, *batch.pop("arena"))
        if "error" in batch:
            raise (DamagedShard if "shard" in batch else UserError)(*batch["error"])
        for message in batch.pop("notes", []):
            note(message)
        self.positions[batch.pop("worker")] = tuple(batch.pop("position"))
        self.consumed += 1
        return batch

    def _from_arena(self, batch: dict, slot: int, plan: list[tuple], n: int, tail_plan: list[tuple] | None) -> None:
        """The batch's features (and small parts, when they came in the slot) as views of this
        process's mapping of its arena slot."""
        if tail_plan is not None:
            batch.update(self.arena.views(int(slot), _received(tail_plan)))
        views = self.arena.views(int(slot), _received(plan))
        features = {path: t[:n] for (group, path), t in views.items() if group == "features"}
        if batch["feature_dtype"] == "bfloat16":
            features = {path: t.view(torch.bfloat16) for path, t in features.items()}
        batch["features"] = features
        batch["scales"] = {path: t[:n] for (group, path), t in views.items() if group == "scales"}
        self.slot = int(slot)
        if self.pin_memory and not self.registered:  # pinned the slow way: a copy, then the slot is free
            batch["features"] = {p: t.pin_memory() for p, t in batch["features"].items()}
            batch["scales"] = {p: t.pin_memory() for p, t in batch["scales"].items()}
            for name, _, _, _ in tail_plan or ():  # the small parts lived in the slot too
                batch[name] = batch[name].pin_memory()
            self._free_slot()

    def copied(self) -> None:
        """The batch in use has been queued for its device copy: its slot may be refilled once
        that copy is done (page-locked slots are read by the GPU after this returns)."""
        if self.registered and self.slot is not None:
            self.event = torch.cuda.Event()
            self.event.record()

    def _free_slot(self) -> None:
        """The arena slot of the batch in use may be filled again."""
        if self.slot is not None:
            if self.registered:  # the GPU may still be reading the slot
                self.event.synchronize() if self.event is not None else torch.cuda.synchronize()
            self.arena.release(self.slot)
            self.slot, self.event = None, None

    def _release(self) -> None:
        """The previous batch's buffers may be filled again."""
        self._free_slot()
        for worker, slot in self.in_use:
            self.board[worker, slot] = 0
        self.in_use = []

    def close(self) -> None:
        del self.iterator
        if self.registered:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(self.arena.storage.data_ptr())
            self.registered = False


def val_batches(stream: ValStream, workers: int, note) -> Iterator[dict]:
    """The validation batches of this rank (a finite pass)."""
    options = {"num_workers": max(0, workers), "batch_size": None}
    if workers:
        options["multiprocessing_context"] = _mp_context()
    for batch in DataLoader(stream, **options):
        if "error" in batch:
            problem, fix = batch["error"]
            raise UserError(problem, f"{fix}, {SKIP_HINT}" if "shard" in batch else fix)
        for message in batch.pop("notes", []):
            note(message)
        if not batch.get("empty"):
            yield batch


def _ignore_sigint(_worker_id: int) -> None:
    """Ctrl-C is the trainer's to handle (it saves a checkpoint); workers just keep decoding,
    each on one core (blosc's own threads would only contend with the other workers)."""
    import signal

    import numcodecs.blosc

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    numcodecs.blosc.use_threads = False


def _mp_context():
    """fork where available (fast start); workers only read files and decode."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
