"""iosd-eval's outputs: report.json, report.md laid out like the papers' tables, PNG pictures.

``results`` everywhere is ``{method: IoUAccumulator.summary(seen, unseen)}`` (e.g. "head",
"daam"). IoUs are fractions in report.json and percentages (two decimals, as the papers
print them) in report.md and on the terminal. Two-object test sets add ``groups``:
``{group: {method: summary}}`` per prompt group, laid out as GD's Table 1 (Seen+Seen: seen;
Seen+Unseen: seen, unseen, harmonic; Unseen+Unseen: unseen).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from iosd import __version__
from iosd.errors import UserError
from iosd.manifest import write_json_atomic, write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PER_CLASS_PNG = "per_class_iou.png"
GRID_DIR = "grids"
GRID_COLUMNS = ("image", "teacher", "head", "daam")
MISSING = "–"


@dataclass
class Example:
    """One evaluated image of a class, for the per-class picture grids."""

    image: np.ndarray  # (H, W, 3)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # column ("teacher", "head", ...) -> (H, W) bool
    ious: dict[str, float] = field(default_factory=dict)  # column -> IoU against the teacher
    caption: str = ""


def percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def _ordered_classes(results: Mapping[str, dict]) -> list[tuple[str, str | None]]:
    """(class, subset) pairs: seen, then unseen, then any other, alphabetical within each."""
    subsets: dict[str, str | None] = {}
    for summary in results.values():
        for name, row in summary["per_class"].items():
            subsets.setdefault(name, row.get("subset"))
    rank = {"seen": 0, "unseen": 1}
    return sorted(subsets.items(), key=lambda kv: (rank.get(kv[1], 2), kv[0]))


def group_columns(groups: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(group, quantity) columns of GD's Table 1: the subsets a group draws from, plus
    their harmonic mean when it mixes seen and unseen classes."""
    cols = []
    for group in groups:
        subsets = [s for s in ("seen", "unseen") if s in group.split("+")]
        cols += [(group, s) for s in subsets] + ([(group, "harmonic")] if len(subsets) == 2 else [])
    return cols


def group_value(summary: dict | None, quantity: str, protocol: str = "miou") -> float | None:
    """One cell of the group table: ``quantity`` seen/unseen/harmonic under ``protocol``."""
    if summary is None:
        return None
    return summary[f"harmonic_{protocol}"] if quantity == "harmonic" else summary[quantity][protocol]


def _group_title(group: str, quantity: str) -> str:
    return f"{group.title()}: {quantity.title()}"


def _group_methods(groups: Mapping[str, Mapping[str, dict]]) -> list[str]:
    return list(dict.fromkeys(m for per in groups.values() for m in per))


def build_report(results: Mapping[str, dict], provenance: Mapping[str, Any], groups: Mapping[str, Mapping[str, dict]] | None = None) -> dict:
    """The report.json document: every method's summary plus where the numbers came from.

    ``groups`` (two-object test sets) adds the per-group summaries under "groups".
    """
    if not results:
        raise UserError("no results to report", "evaluate at least one method")
    extra = {"groups": {g: dict(per) for g, per in groups.items()}} if groups else {}
    return {
        "iosd_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "units": "IoU as fractions in [0, 1]; report.md shows percentages",
        "protocols": {
            "miou": "GD: per class, sum of intersections / sum of unions over its images; mean over the subset's classes",
            "pooled_iou": "IOSD: IoU per image, mean over all images of the subset's classes",
            "harmonic": "2 * seen * unseen / (seen + unseen)",
        },
        "methods": dict(results),
        **extra,
        "provenance": dict(provenance),
    }


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(report: dict) -> str:
    """report.md: the papers' table (methods x Seen / Unseen / Harmonic), then per class."""
    methods = report["methods"]
    names = list(methods)
    out = ["# iosd evaluation", ""]
    out += ["mIoU (%), category-wise (Grounded Diffusion protocol): IoU of each class over all its images, averaged over the classes of a subset.", ""]
    out += _table(
        ["Method", "Seen", "Unseen", "Harmonic"],
        [[m, percent(s["seen"]["miou"]), percent(s["unseen"]["miou"]), percent(s["harmonic_miou"])] for m, s in methods.items()],
        "lrrr",
    )
    out += ["", "Pooled per-image IoU (%) (IOSD protocol): IoU of each image, averaged over all images of a subset.", ""]
    out += _table(
        ["Method", "Seen", "Unseen", "Harmonic"],
        [[m, percent(s["seen"]["pooled_iou"]), percent(s["unseen"]["pooled_iou"]), percent(s["harmonic_pooled_iou"])] for m, s in methods.items()],
        "lrrr",
    )
    first = methods[names[0]]
    rows = []
    for cls, subset in _ordered_classes(methods):
        images = first["per_class"].get(cls, {}).get("images", 0)
        rows.append([cls, subset or MISSING, str(images)] + [percent(methods[m]["per_class"].get(cls, {}).get("iou")) for m in names])
    out += ["", "## Per class (IoU %)", ""]
    out += _table(["Class", "Split", "Images"] + names, rows, "llr" + "r" * len(names))
    if report.get("groups"):
        out += ["", *_group_markdown(report["groups"])]
    differ = [m for m in names[1:] if {c: r["images"] for c, r in methods[m]["per_class"].items()} != {c: r["images"] for c, r in first["per_class"].items()}]
    if differ:
        out += ["", f"Image counts are those of {names[0]}; {', '.join(differ)} saw other counts (see report.json)."]
    missing = sorted({c for s in methods.values() for sub in ("seen", "unseen") for c in s[sub]["missing"]})
    if missing:
        out += ["", f"No IoU (no images, or prediction and target empty everywhere), left out of the means: {', '.join(missing)}."]
    counts = {m: (s["seen"]["images"], s["unseen"]["images"]) for m, s in methods.items()}
    out += ["", "Images per subset: " + "; ".join(f"{m}: {a} seen, {b} unseen" for m, (a, b) in counts.items()) + "."]
    out += ["", "## Provenance", ""]
    for key, value in report["provenance"].items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        out.append(f"- **{key}**: `{text}`")
    out += [f"- **iosd**: `{report['iosd_version']}`", f"- **created (UTC)**: `{report['created_utc']}`", ""]
    return "\n".join(out)


def _group_markdown(groups: Mapping[str, Mapping[str, dict]]) -> list[str]:
    """GD's Table 1: two-object prompts, one column block per group, mIoU then pooled IoU."""
    cols = group_columns(groups)
    header = ["Method"] + [_group_title(g, q) for g, q in cols]
    out = ["## Two-object prompts by group (GD Table 1)", ""]
    out += ["mIoU (%), category-wise: a class's IoU over the images of that group only.", ""]
    for protocol, title in (("miou", None), ("pooled_iou", "Pooled per-image IoU (%) by group (IOSD protocol).")):
        if title:
            out += ["", title, ""]
        rows = [[m] + [percent(group_value(groups[g].get(m), q, protocol)) for g, q in cols] for m in _group_methods(groups)]
        out += _table(header, rows, "l" + "r" * len(cols))
    return out


def writable_dir(out_dir: str | Path) -> Path:
    """The report directory, created; a UserError when it cannot be written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"report path {out} is a file, not a directory", "pass a directory for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report directory {out} ({err.strerror})", "choose a writable --report directory") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"no permission to write in the report directory {out}", "choose a writable --report directory or fix its permissions")
    return out


def safe_name(name: str) -> str:
    """A file name for a class name ("potted plant" -> "potted_plant")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def class_grid(examples: Sequence[Example], columns: Sequence[str] = GRID_COLUMNS, tile: int = 192):
    """One class's picture: a row per example, columns image / teacher / head / DAAM."""
    from iosd.viz import grid, overlay

    tiles, titles = [], []
    for ex in examples:
        for col in columns:
            if col == "image":
                tiles.append(ex.image)
                titles.append(ex.caption or "image")
            elif col in ex.masks and ex.masks[col] is not None:
                tiles.append(overlay(ex.image, np.asarray(ex.masks[col], bool)[None]))
                iou = ex.ious.get(col)
                titles.append(f"{col}" + (f" IoU {100 * iou:.1f}" if iou is not None else ""))
            else:
                tiles.append(np.full((8, 8, 3), 235, np.uint8))
                titles.append(f"{col}: n/a")
    return grid(tiles, titles, ncols=len(columns), tile=tile)


def per_class_chart(results: Mapping[str, dict]):
    """Grouped horizontal bars of per-class IoU for every method (seen classes first)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt
    from PIL import Image

    classes = _ordered_classes(results)
    n, k = len(classes), len(results)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * n * max(1, k) + 1)), dpi=100)
    height = 0.8 / max(1, k)
    for j, (method, summary) in enumerate(results.items()):
        values = [summary["per_class"].get(c, {}).get("iou") for c, _ in classes]
        ax.barh(np.arange(n) + j * height, [100 * (v or 0) for v in values], height=height, label=method)
    ax.set_yticks(np.arange(n) + 0.4 - height / 2, [f"{c} ({s or '?'})" for c, s in classes], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def write_report(
    out_dir: str | Path,
    results: Mapping[str, dict],
    provenance: Mapping[str, Any],
    examples: Mapping[str, Sequence[Example]] | None = None,
    columns: Sequence[str] = GRID_COLUMNS,
    groups: Mapping[str, Mapping[str, dict]] | None = None,
) -> dict[str, Path | list[Path]]:
    """Write report.json, report.md, per_class_iou.png and grids/<class>.png (all atomically)."""
    from iosd.viz import save_png_atomic

    out = writable_dir(out_dir)
    report = build_report(results, provenance, groups)
    written: dict[str, Path | list[Path]] = {}
    try:
        write_json_atomic(out / REPORT_JSON, report)
        written["json"] = out / REPORT_JSON
        write_text_atomic(out / REPORT_MD, render_markdown(report))
        written["md"] = out / REPORT_MD
    except OSError as err:
        raise UserError(f"cannot write the report in {out} ({err.strerror})", "choose a writable --report directory") from None
    written["chart"] = save_png_atomic(per_class_chart(results), out / PER_CLASS_PNG)
    grids = []
    for cls, items in (examples or {}).items():
        if items:
            grids.append(save_png_atomic(class_grid(items, columns), out / GRID_DIR / f"{safe_name(cls)}.png"))
    written["grids"] = grids
    return written


def print_table(results: Mapping[str, dict], console=None, groups: Mapping[str, Mapping[str, dict]] | None = None) -> None:
    """The headline table on the terminal: one row per method (and GD's group table, if any)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="mIoU (%)", caption=escape("[pooled per-image IoU, IOSD protocol]"))
    table.add_column("Method", style="bold")
    for col in ("Seen", "Unseen", "Harmonic"):
        table.add_column(col, justify="right")
    for method, s in results.items():
        table.add_row(
            escape(method),
            escape(f"{percent(s['seen']['miou'])} [{percent(s['seen']['pooled_iou'])}]"),
            escape(f"{percent(s['unseen']['miou'])} [{percent(s['unseen']['pooled_iou'])}]"),
            escape(f"{percent(s['harmonic_miou'])} [{percent(s['harmonic_pooled_iou'])}]"),
        )
    console = console or Console()
    console.print(table)
    if groups:
        console.print(_group_table(groups))


def _group_table(groups: Mapping[str, Mapping[str, dict]]):
    from rich.markup import escape
    from rich.table import Table

    cols = group_columns(groups)
    table = Table(title="two-object prompts by group: mIoU (%)", caption=escape("[pooled per-image IoU, IOSD protocol]"))
    table.add_column("Method", style="bold")
    for g, q in cols:
        table.add_column(f"{g.title()}\n{q.title()}", justify="right")
    for m in _group_methods(groups):
        cells = [f"{percent(group_value(groups[g].get(m), q))} [{percent(group_value(groups[g].get(m), q, 'pooled_iou'))}]" for g, q in cols]
        table.add_row(escape(m), *map(escape, cells))
    return table
