"""What a training run shows and leaves behind: progress bar, metrics.jsonl, curve PNG, TensorBoard.

``metrics.jsonl`` has one record per logged step (``loss``, ``lr``, ``samples_per_s``) and
per validation (``val_miou`` ...). A resumed run first drops the records past its checkpoint,
so the file (and the curve drawn from it) continues the interrupted run without a seam.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "curve.png"


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is lost anyway
    return records


class MetricsLog:
    """Appends records to metrics.jsonl (rank 0) and mirrors them to TensorBoard if installed."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_NAME
        self.enabled = enabled
        self.tb = _tensorboard(self.run_dir / "tensorboard") if enabled and tensorboard else None

    def truncate_after(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run redoes what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{METRICS_NAME}.tmp-{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.tb is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _tensorboard(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(log_dir))


def plot_curve(run_dir: str | Path) -> Path | None:
    """loss (log scale) and validation mIoU against step, as curve.png in the run directory."""
    records = read_metrics(run_dir)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r and r["loss"] is not None]
    vals = [(r["step"], r["val_miou"]) for r in records if r.get("val_miou") is not None]
    if not losses and not vals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if losses:
        ax.plot(*zip(*losses, strict=True), color="tab:blue", lw=1.2, label="train loss")
        if min(v for _, v in losses) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if vals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*vals, strict=True), color="tab:orange", marker="o", ms=3, lw=1.2, label="val mIoU")
        for key, style in (("val_seen_miou", "--"), ("val_unseen_miou", ":")):
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                ax2.plot(*zip(*pts, strict=True), color="tab:orange", ls=style, lw=1, label=key.replace("val_", "val ").replace("_miou", " mIoU"))
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("validation mIoU", color="tab:orange")
        ax2.legend(loc="lower right", fontsize=8)
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / CURVE_NAME
    tmp = out.with_name(f".{CURVE_NAME}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out


class Progress:
    """Training progress with the latest loss and samples/s: a bar on a terminal, plain lines in
    a log (``iosd.progress`` decides), or nothing."""

    FIELDS = {"loss": "loss {}", "speed": "{} samples/s", "val": "{}"}

    def __init__(self, show: bool, total: int, done: int, label: str, console: Console | None = None) -> None:
        self.show = show
        self.bar = None
        if show:
            from iosd.progress import open_progress

            values = {"loss": "-", "speed": "-", "val": ""}
            self.bar = open_progress("train", label, total, done, unit="step", fields=self.FIELDS, values=values, console=console)

    def advance(self, step: int, **fields) -> None:
        if self.bar is not None:
            self.bar.update(step, **fields)

    def print(self, message: str) -> None:
        """A line above the bar (or on stderr without one)."""
        if self.bar is not None:
            self.bar.print(message)
        else:
            import sys

            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
