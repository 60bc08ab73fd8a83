"""One way to fail: a one-line message naming the problem and the fix, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """Bad input or environment that the user can fix; printed as one line, exit code 2."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} ({self.fix})" if self.fix else self.problem


def user_errors(func: F) -> F:
    """Decorate a click command so UserError (and Ctrl-C) end with one line, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            from rich.console import Console

            Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {err.line()}", markup=True)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]
