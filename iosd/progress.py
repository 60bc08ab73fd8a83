"""The progress every long iosd command shows (or nothing when quiet / not rank 0).

On a terminal a rich bar; elsewhere (a log file, CI) a live bar only prints cut, so plain
lines instead, every tenth of the work or every 30 s, whichever comes first, and a final one.
``open_progress`` is the one place that decides; progress goes to stderr, so a command's result
on stdout (JSON) stays clean.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.console import Console

PLAIN_EVERY_S = 30.0  # a plain line at least this often while work advances
PLAIN_STEPS = 10  # ... and at each tenth of the total


class Reporter(Protocol):
    """What a command drives: ``update`` as work advances, ``print`` a line, ``close`` at the end."""

    def update(self, completed: int | None = None, advance: int = 0, **fields: str) -> None: ...

    def print(self, message: str) -> None: ...

    def close(self) -> None: ...


def progress_console() -> Console:
    """The console progress is shown on: stderr (rich honours FORCE_TERMINAL, NO_COLOR...)."""
    from rich.console import Console

    return Console(stderr=True)


def live_bar_fits(console: Console) -> bool:
    """A live bar only where it can redraw itself: an interactive, non-dumb terminal."""
    return console.is_terminal and not console.is_dumb_terminal


def open_progress(
    stage: str,
    label: str,
    total: int,
    done: int = 0,
    *,
    unit: str = "",
    fields: Mapping[str, str] | None = None,
    values: Mapping[str, str] | None = None,
    console: Console | None = None,
) -> Reporter:
    """A bar or plain lines for ``total`` units, ``done`` of them already done (a resumed run).

    ``fields`` maps a field's name to its template (``{"loss": "loss {}"}``); ``values`` are the
    fields' first values; ``update(step, loss="0.1")`` changes them.
    """
    console = console or progress_console()
    fields = dict(fields or {})
    values = {name: "" for name in fields} | dict(values or {})
    kind = RichBar if live_bar_fits(console) else PlainLines
    return kind(console, stage, label, total, done, unit, fields, values)


class RichBar:
    """The rich bar: stage, label, bar, done/total, the fields, elapsed and remaining time."""

    def __init__(self, console: Console, stage: str, label: str, total: int, done: int, unit: str,
                 fields: dict[str, str], values: dict[str, str]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        texts = [TextColumn(template.replace("{}", f"{{task.fields[{name}]}}")) for name, template in fields.items()]
        columns = (TextColumn(f"[bold]{stage}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(), *texts)
        self.bar = Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.bar.__enter__()
        self.task = self.bar.add_task(label, total=total, completed=done, **values)

    def update(self, completed: int | None = None, advance: int = 0, **fields: str) -> None:
        self.bar.update(self.task, completed=completed, advance=advance or None, **fields)

    def print(self, message: str) -> None:
        self.bar.console.print(message, highlight=False, markup=False)

    def close(self) -> None:
        self.bar.__exit__(None, None, None)


class PlainLines:
    """``train runs/x step 500/1000 loss 0.1024 28.4 samples/s elapsed 0:01:10 eta 0:01:10``,
    periodically: a log keeps a readable history instead of a bar's last, cut frame."""

    def __init__(self, console: Console, stage: str, label: str, total: int, done: int, unit: str,
                 fields: dict[str, str], values: dict[str, str], *, every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()  # advanced from worker threads in places
        self.console, self.total, self.fields, self.values = console, total, fields, values
        self.head = " ".join(part for part in (stage, label, unit) if part)
        self.every_s, self.clock = every_s, clock
        self.stride = max(1, math.ceil(total / PLAIN_STEPS))
        self.start_done = self.completed = done
        self.start = self.last_time = clock()
        self.next_mark = self._mark_after(done)
        self.stale = True  # something the last line did not say yet

    def _mark_after(self, completed: int) -> int:
        return (completed // self.stride + 1) * self.stride

    def update(self, completed: int | None = None, advance: int = 0, **fields: str) -> None:
        with self.lock:
            before = (self.completed, dict(self.values))
            self.completed = (self.completed if completed is None else completed) + advance
            self.values.update(fields)
            self.stale = self.stale or before != (self.completed, self.values)
            if self.stale and (self.completed >= self.next_mark or self.clock() - self.last_time >= self.every_s):
                self._emit()

    def print(self, message: str) -> None:
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        """The final line (with the last fields, e.g. the final validation), unless already said."""
        with self.lock:
            if self.stale:
                self._emit()

    def _emit(self) -> None:
        now = self.clock()
        self.print(self.line(now - self.start))
        self.stale, self.last_time = False, now
        self.next_mark = self._mark_after(self.completed)

    def line(self, elapsed: float) -> str:
        shown = [template.replace("{}", self.values[name]) for name, template in self.fields.items() if self.values.get(name) not in ("", "-")]
        return " ".join([self.head, f"{self.completed}/{self.total}", *shown, f"elapsed {_clock(elapsed)}", f"eta {self._eta(elapsed)}"])

    def _eta(self, elapsed: float) -> str:
        moved = self.completed - self.start_done
        if moved <= 0:
            return "-:--:--"
        return _clock(elapsed / moved * max(0, self.total - self.completed))


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class stage_progress:
    """``with stage_progress(show, total, label, stage) as advance: advance(n=1)``; ``advance`` is
    None when not shown, so callers skip the call."""

    def __init__(self, show: bool, total: int, label: str, stage: str, console: Console | None = None, unit: str = "") -> None:
        self.show, self.total, self.label, self.stage, self.console, self.unit = show, total, label, stage, console, unit
        self.reporter: Reporter | None = None

    def __enter__(self) -> Callable[..., None] | None:
        if not self.show:
            return None
        self.reporter = open_progress(self.stage, self.label, self.total, unit=self.unit, console=self.console)
        return lambda n=1: self.reporter.update(advance=n)

    def __exit__(self, *exc) -> None:
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
