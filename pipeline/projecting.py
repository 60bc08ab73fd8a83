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
    load,
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
    from iosd.store import is_remote

    if c.out is not None and is_remote(c.out):
        raise UserError(f"--project with an object-store --out ({c.out}) is not supported yet", "write the set to a local directory and copy it up, or drop --project")
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


def _previous(c: GenConfig) -> dict | None:
    """The manifest already in --out (None when there is none or it is unreadable: the writer says why)."""
    path = Path(c.out) / MANIFEST_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def open_output(gen: Generator) -> None:
    """Rank 0: refuse another K on an existing set (one line, before any work), then let the
    writer make --out ours; remember the basis record of a set with the same identity."""
    c, old = gen.cfg, _previous(gen.cfg)
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


def _sha(path: Path) -> str:
    from iosd.manifest import sha256_file

    return sha256_file(path)


def _keep_first(projection: Projection, path: Path) -> Projection:
    """Independent tasks each fit the basis; the first stored wins (a hard link fails where
    the name exists) and every task uses that one, so no two shards of a set ever differ in it."""
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
    return load(path)


def prepare_projection(gen: Generator) -> Projection | None:
    """Every rank's projection (None without --project). Rank 0 reuses the stored basis of a
    rerun (its sha256 as the manifest recorded it) or fits and writes a new one, then records
    it in the manifest; shards already written with a basis that is now missing or altered
    are refused, never mixed with a new one."""
    from iosd.pipeline.generate import _barrier, _on_rank0

    c = gen.cfg
    if c.project is None:
        return None
    path = Path(c.out) / PROJECTION_NAME
    box: list[Projection] = []

    def make() -> None:
        previous = getattr(gen, "previous_projection", None)
        projection = None
        if previous is not None and path.is_file():
            try:
                projection = load(path, previous)
            except UserError:
                if gen.writer.done():
                    raise
        elif gen.task.count > 1 and path.is_file():
            projection = load(path)  # another task of this set stored it first
        elif gen.writer.done():
            raise UserError(f"projection basis {path} is missing, but {c.out} holds shards stored with it", "restore it, or pass --overwrite to regenerate the set")
        if projection is None:
            projection = _calibrate(gen)
            if gen.task.count > 1:
                projection = _keep_first(projection, path)
            sha = projection.save(path) if gen.task.count == 1 else _sha(path)
        else:
            from iosd.manifest import sha256_file

            sha = sha256_file(path)
        gen.writer.header["features"]["projection"] = projection.record(sha, c.calibration_samples)
        gen.writer.write_manifest()
        box.append(projection)

    _on_rank0(gen.world, gen.rank, make)
    _barrier(gen.world)
    if box:
        return box[0]
    manifest = json.loads((Path(c.out) / MANIFEST_NAME).read_text())
    record = manifest_record(manifest)
    gen.writer.header["features"]["projection"] = record
    return load(path, record)
