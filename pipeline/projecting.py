"""``iosd-gen --project K``: fit (or reuse) the shard set's projection before its first shard.

The basis is fitted on the calibration stream, the first ``--calibration-samples`` candidates
of the plan (shard 0's first candidates, then shard 1's, ...: the same seeds every run), and
written beside ``dataset.json`` before any shard; a rerun with the same settings reuses it
(checked against the sha256 the manifest recorded), a different K is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from iosd.choices import DEFAULT_CALIBRATION
from iosd.errors import UserError
from iosd.projection import (
    PROJECTION_NAME,
    CovarianceFit,
    Projection,
    check_k,
    from_bytes,
    manifest_record,
    projected_layers,
)
from iosd.schema import MANIFEST_NAME

if TYPE_CHECKING:
    from iosd.pipeline.generate import GenConfig, Generator


def check_projection_options(c: GenConfig) -> None:
    """Fill --calibration-samples' default and refuse values that cannot work."""
    if c.project is None:
        if c.calibration_samples is not None:
            raise UserError("--calibration-samples only applies to a projection", "add --project K, or drop --calibration-samples")
        return
    if c.project < 1:
        raise UserError(f"--project {c.project} is not a positive number of channels", "pass e.g. --project 64, or leave it out to store every layer")
    if c.calibration_samples is None:
        c.calibration_samples = DEFAULT_CALIBRATION
    if c.calibration_samples < 1:
        raise UserError(f"--calibration-samples must be positive (got {c.calibration_samples})", "pass a number > 0")


def stored_shapes(c: GenConfig, shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """What each sample stores: the captured layers, or one (K, side, side) array per group."""
    if c.project is None:
        return shapes
    raw = [[p, s] for p, s in shapes.items()]
    check_k(c.project, raw)
    return {e["path"]: e["shape"] for e in projected_layers(c.project, raw)}


def _previous(gen: Generator) -> dict | None:
    """The manifest already in --out, a directory or a URL (None when there is none or it is
    unreadable: the writer says why)."""
    try:
        held = gen.writer.store.read_bytes(MANIFEST_NAME)
        return json.loads(held) if held is not None else None
    except (OSError, ValueError):
        return None


def open_output(gen: Generator) -> None:
    """Rank 0: refuse another K on an existing set (one line, before any work), then let the
    writer make --out ours; remember the basis record of a set with the same identity."""
    c, old = gen.cfg, _previous(gen)
    gen.previous_projection = None
    if old is not None and not c.overwrite:
        had = (old.get("identity") or {}).get("project")
        if had != c.project and old.get("kind") == "iosd-shards":
            held = f"features projected to K={had}" if had is not None else "raw (unprojected) features"
            asked = f"--project {c.project}" if c.project is not None else "no --project"
            keep = f"--project {had}" if had is not None else "no --project"
            raise UserError(f"{c.out} stores {held}, not {asked}", f"pass {keep} to resume it, --overwrite to regenerate it, or another --out")
    if old is not None and old.get("identity") == gen.writer.header["identity"] and manifest_record(old):
        # a rerun: the manifest keeps the basis record its shards were written with
        gen.previous_projection = gen.writer.header["features"]["projection"] = manifest_record(old)
    gen.writer.prepare()


def _calibrate(gen: Generator) -> Projection:
    """The basis fitted on the first ``calibration_samples`` candidates (all of them used,
    whatever the filter later keeps)."""
    from iosd.progress import stage_progress

    c, plan = gen.cfg, gen.plan
    order = [(shard, attempt) for shard in range(plan.n_shards) for attempt in range(plan.target(shard))]
    chosen = order[: c.calibration_samples]
    fit: CovarianceFit | None = None
    t0 = time.perf_counter()
    with stage_progress(not c.quiet, len(chosen), f"{c.out}: calibrating the projection", "gen") as advance:
        for start in range(0, len(chosen), c.batch_size):
            batch = [plan.candidate(shard, attempt) for shard, attempt in chosen[start : start + c.batch_size]]
            out = gen._produce(batch)
            if fit is None:
                fit = CovarianceFit([[p, list(t.shape[1:])] for p, t in out.features.items()])
            fit.add(out.features)
            for _ in batch if advance is not None else ():
                advance()
    gen.times.add("calibrate", time.perf_counter() - t0)
    return fit.fit(c.project)


def _keep_first(path: Path, projection: Projection) -> bytes:
    """Independent tasks on disk: the first basis stored wins (a hard link fails where the name
    exists) and every task uses that one, so no two shards of a set ever differ in it. (An
    object store has no such test: there task 0 alone fits and stores it.)"""
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.{secrets.token_hex(4)}")
    projection.save(tmp)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


def prepare_projection(gen: Generator) -> Projection | None:
    """Every rank's projection (None without --project). Rank 0 reuses the stored basis of a
    rerun (its sha256 as the manifest recorded it) or fits and writes a new one, then records
    it in the manifest; shards already written with a basis that is now missing or altered
    are refused, never mixed with a new one. --out may be a directory or a URL."""
    import hashlib

    from iosd.pipeline.generate import _barrier, _on_rank0

    c = gen.cfg
    if c.project is None:
        return None
    store = gen.writer.store
    where = store.shown(PROJECTION_NAME)
    box: list[Projection] = []

    def make() -> None:
        previous = getattr(gen, "previous_projection", None)
        held = store.read_bytes(PROJECTION_NAME)
        projection = None
        if previous is not None and held is not None:
            try:
                projection = from_bytes(held, where, previous)
            except UserError:
                if gen.writer.done():
                    raise
                held = None
        elif gen.task.count > 1 and held is not None:
            projection = from_bytes(held, where)  # another task of this set stored it first
        elif gen.writer.done():
            raise UserError(f"projection basis {where} is missing, but {c.out} holds shards stored with it", "restore it, or pass --overwrite to regenerate the set")
        else:
            held = None
        if projection is None:
            if store.remote and gen.task.count > 1 and gen.task.index != 0:
                raise UserError(f"the projection basis {where} is not there yet: in an object store, task 0 of the set fits and stores it",
                                f"start task 0 first (--task 0/{gen.task.count}); once its basis is stored, rerun this task")
            projection = _calibrate(gen)
            if gen.task.count > 1 and not store.remote:
                held = _keep_first(Path(store.root) / PROJECTION_NAME, projection)
                projection = from_bytes(held, where)
            else:  # one task, or task 0 of a set in an object store
                held = projection.to_bytes()
                store.put_bytes(PROJECTION_NAME, held)
        gen.writer.header["features"]["projection"] = projection.record(hashlib.sha256(held).hexdigest(), c.calibration_samples)
        gen.writer.write_manifest()
        box.append(projection)

    _on_rank0(gen.world, gen.rank, make)
    _barrier(gen.world)
    if box:
        return box[0]
    record = manifest_record(json.loads(store.read_bytes(MANIFEST_NAME)))
    gen.writer.header["features"]["projection"] = record
    return from_bytes(store.read_bytes(PROJECTION_NAME) or b"", where, record)
