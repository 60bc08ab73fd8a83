"""The one rich progress bar every long iosd command shows (or nothing when quiet / not rank 0)."""

from __future__ import annotations

from collections.abc import Callable


class stage_progress:
    """``with stage_progress(show, total, label, stage) as advance: advance(n=1)``; ``advance`` is
    None when not shown, so callers skip the call."""

    def __init__(self, show: bool, total: int, label: str, stage: str) -> None:
        self.show, self.total, self.label, self.stage = show, total, label, stage

    def __enter__(self) -> Callable[..., None] | None:
        if not self.show:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn(f"[bold]{self.stage}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.show:
            self.bar.__exit__(*exc)
