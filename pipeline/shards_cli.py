"""``iosd-shards``: verify a shard set against its manifest, summarise it, preview it as a PNG.

Thin printing layer over ``iosd.pipeline.verify``. DIRECTORY is a local directory or an
fsspec URL (s3://bucket/set, gs://...): both go through ``iosd.store``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from iosd.errors import user_errors
from iosd.progress import live_bar_fits, progress_console, stage_progress

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Check, summarise and preview iosd shard sets."""


@main.command()
@click.argument("directory")
@click.option("--quiet", is_flag=True, help="no progress bar")
@user_errors
def verify(directory: str, quiet: bool) -> None:
    """Check every shard listed in DIRECTORY/dataset.json: present, size, sha256, readable to the
    end, every sample complete and decodable. Exit code 1 names each bad shard. DIRECTORY may
    be an fsspec URL (s3://bucket/set): each shard is streamed once, nothing is kept."""
    from iosd.pipeline import verify as shardcheck  # here, not at the top: --help stays instant

    total = shardcheck.bytes_to_read(directory)
    console = progress_console()
    if quiet or not live_bar_fits(console):  # iosd.progress decides: plain lines in a log, or nothing
        with stage_progress(not quiet, total, f"hashing {directory}", "verify", console=console, unit="bytes") as advance:
            report = shardcheck.verify_shards(directory, progress=advance)
    else:  # a terminal: the byte bar (size, speed) that redraws in place
        columns = (TextColumn("hashing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("verify", total=total)
            report = shardcheck.verify_shards(directory, progress=lambda n: bar.advance(task, n))
    out = Console(highlight=False, soft_wrap=True)
    for problem in report.problems:
        out.print(problem.line(), markup=False)
    summary = f"{report.shards} shards listed, {report.samples} samples decoded, {report.bytes} bytes read"
    if report.ok:
        out.print(f"[green]OK[/]: {summary}")
        return
    out.print(f"[red]FAILED[/]: {len(report.problems)} problem(s) in {escape(report.directory)}; {summary}")
    if any(p.kind in (shardcheck.MISSING, shardcheck.CORRUPT) for p in report.problems):
        out.print(f"fix: delete the corrupt tars and rerun the iosd-gen command that wrote this set (--out {report.directory}): it regenerates exactly the missing shards", markup=False)
    sys.exit(1)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _info_tables(info: dict) -> list[Table]:
    from iosd.schema import DECISIONS

    overview = Table(title=f"shard set {info['directory']}", show_header=False)
    overview.add_column("field", style="bold")
    overview.add_column("value")
    classes = info["classes"]
    rows = [
        ("complete", str(info["complete"])),
        ("masks meaningful", str(info["masks_meaningful"])),
        ("shards", f"{info['shards']} of {info['planned_shards']} planned"),
        ("samples", str(info["samples"])),
        ("bytes", f"{_size(info['bytes'])} total, {_size(info['bytes_per_sample'])} per sample"),
        ("image size", str(info["image_size"])),
        ("classes", f"{classes['name']} split {classes['split']}, subset {info['subset']} ({len(classes['seen'])} seen, {len(classes['unseen'])} unseen)"),
        ("features", f"{info['features']['dtype']} / {info['features']['codec']}, {_size(info['features']['raw_bytes_per_sample'])} raw, {_size(info['features']['stored_bytes_per_sample'])} stored per sample"),
        ("teacher", json.dumps(info["teacher"], sort_keys=True) if info["teacher"] is not None else "-"),
        *((f"config.{k}", str(v)) for k, v in info["config"].items()),
        *(("note", n) for n in info["notes"]),
        ("schema / iosd", f"{info['schema_version']} / {info['iosd_version']}"),
    ]
    for row in rows:
        overview.add_row(*row)
    layers = Table(title="feature layers")
    for col in ("path", "C x H x W"):
        layers.add_column(col)
    for layer in info["features"]["layers"]:
        layers.add_row(str(layer["path"]), " x ".join(map(str, layer["shape"] or [])))
    per_class = Table(title=f"per-class counts (from {info['per_class_source']})")
    for col in ("class", "subset", *DECISIONS):
        per_class.add_column(col, justify="left" if col in ("class", "subset") else "right")
    for name, counts in info["per_class"].items():
        per_class.add_row(name, counts["subset"], *(str(counts[d]) for d in DECISIONS))
    return [overview, layers, per_class]


@main.command()
@click.argument("directory")
@click.option("--json", "as_json", is_flag=True, help="print machine-readable JSON")
@click.option("--scan", is_flag=True, help="count classes from every sample's JSON instead of the manifest")
@user_errors
def info(directory: str, as_json: bool, scan: bool) -> None:
    """Summarise a shard set (a directory or an fsspec URL): size, classes, feature layout,
    generation config."""
    from iosd.pipeline import verify as shardcheck

    summary = shardcheck.summarize(directory, scan=scan)
    if as_json:
        click.echo(json.dumps(summary, indent=1, sort_keys=True))
        return
    console = Console(highlight=False)
    for table in _info_tables(summary):
        console.print(table)


@main.command()
@click.argument("directory")
@user_errors
def merge(directory: str) -> None:
    """Write DIRECTORY/dataset.json and wids-index.json from the shards' records, once every
    planned shard is there: for a set made by independent tasks (iosd-gen --task I/N) whose
    last task did not finish. Idempotent; an incomplete set names the missing shards.
    DIRECTORY may be an fsspec URL (s3://bucket/set) where the tasks wrote to object storage."""
    from iosd.pipeline.tasks import merge_set

    click.echo(json.dumps(merge_set(directory)))


@main.command()
@click.argument("directory")
@click.option("--n", "count", type=int, default=16, help="how many samples")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="PNG to write, always locally [default: DIRECTORY/preview.png; for a URL ./NAME-preview.png]")
@click.option("--ncols", type=int, default=4, help="tiles per row")
@user_errors
def show(directory: str, count: int, out: Path | None, ncols: int) -> None:
    """Render the first samples with their masks and class scores as a PNG grid. DIRECTORY
    may be an fsspec URL (s3://bucket/set): only the first shards are read."""
    from iosd.pipeline import verify as shardcheck

    path = shardcheck.preview(directory, count, out, ncols=ncols)
    click.echo(f"wrote {path}")
