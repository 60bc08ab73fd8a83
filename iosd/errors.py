"""One way to fail: a one-line message naming the problem and the fix, never a traceback."""

from __future__ import annotations

import errno
import functools
import os
import re
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


RESUME = "then rerun the same command to resume"
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
_NOT_WRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)\.(?:tmp-\d+(?:\.\w+)?|old-\d+|\w{8}\.tmp)$")
_OS_CODE = re.compile(r"\bcode: (\d+)")


def os_errno(err: BaseException) -> int | None:
    """The errno behind an OSError, or behind a library error that only quotes it in its message
    (safetensors' ``SafetensorError``: "IoError(Os { code: 28, ... })")."""
    if isinstance(err, OSError):
        return err.errno
    found = _OS_CODE.search(str(err))
    if found:
        return int(found.group(1))
    return errno.ENOSPC if "No space left on device" in str(err) else None


def name_path(err: BaseException, path: str | os.PathLike) -> None:
    """Give an OSError from a write on an open file (which names no file) the path written."""
    if isinstance(err, OSError) and not err.filename:
        err.filename = os.fspath(path)


def shown_path(filename: object) -> str | None:
    """The path a user knows: temp names (``.shard-000003.tar.tmp-123``) as the file they become."""
    if not filename:
        return None
    parts = os.fsdecode(os.fspath(filename)).split(os.sep) if isinstance(filename, (str, bytes, os.PathLike)) else [str(filename)]
    return os.sep.join(m.group("name") if (m := _TEMP_NAME.match(part)) else part for part in parts)


def storage_error(err: BaseException, rerun: str = RESUME, elsewhere: str | None = "pass --out elsewhere") -> UserError | None:
    """The one-line UserError for a full disk or an unwritable output, None for other errors.
    ``elsewhere``: the other way out besides freeing space or permissions (None: a command
    that writes where its input is, such as ``iosd-shards merge``, has none)."""
    code = os_errno(err) if isinstance(err, OSError) or type(err).__name__ == "SafetensorError" else None
    path = shown_path(getattr(err, "filename", None))
    other = f" or {elsewhere}" if elsewhere else ""
    if code in _DISK_FULL:
        where = f" writing {path}" if path else ""
        return UserError(f"{_DISK_FULL[code]}{where}", f"free space{other}, {rerun}")
    if code in _NOT_WRITABLE:
        where = f" on {path}" if path else ""
        return UserError(f"{_NOT_WRITABLE[code]}{where}", f"make it writable{other}, {rerun}")
    return None


# Object-store faults, known by class name so that botocore, aiohttp and s3fs are never imported here.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ProxyConnectionError",
                "ClientConnectionError", "ServerDisconnectedError", "ClientPayloadError", "FSTimeoutError", "ConnectionError", "TimeoutError"}
_STORE_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec", "adlfs")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def remote_error(err: BaseException, url: str | None, action: str = "reach", rerun: str = RESUME) -> UserError | None:
    """The one-line UserError for an object store that is unreachable, refuses the credentials,
    lacks the bucket or fails mid-upload; None for other errors. ``url``: what was being read
    or written (None when the caller does not know)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    where = f" {url}" if url else ""
    fix = f"check the endpoint (AWS_ENDPOINT_URL or fsspec config) and the credentials, {rerun}"
    if names & _NO_CREDENTIALS:
        return UserError(f"no credentials to {action}{where} ({_first_line(err)})", f"set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), {rerun}")
    if names & _UNREACHABLE or isinstance(err, (ConnectionError, TimeoutError)):
        return UserError(f"cannot reach the object store to {action}{where} ({_first_line(err)})", fix)
    if isinstance(err, FileNotFoundError) and "bucket" in str(err).lower():
        return UserError(f"the bucket of{where} does not exist ({_first_line(err)})", f"create the bucket or fix the URL, {rerun}")
    if isinstance(err, PermissionError):
        return UserError(f"access denied to {action}{where} ({_first_line(err)})", f"check the credentials and the bucket's policy, {rerun}")
    if url is not None and (isinstance(err, OSError) or "ClientError" in names or "BotoCoreError" in names):
        return UserError(f"the object store failed to {action}{where} ({type(err).__name__}: {_first_line(err)})", fix)
    return None


def _from_store_library(err: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] in _STORE_MODULES for cls in type(err).__mro__)


def _exit_with(err: UserError) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(err.line())}", markup=True)
    sys.exit(2)


def user_errors(func: F | None = None, *, rerun: str = RESUME, kept: str = "finished shards are kept") -> Any:
    """Decorate a click command so UserError, a full disk or an unwritable output (and Ctrl-C)
    end with one line, not a traceback. ``rerun``: how to pick up again after the disk fault
    (``@user_errors(rerun=...)``; bare ``@user_errors`` says rerun the same command); ``kept``:
    what a Ctrl-C leaves behind ("checkpoints are kept" for a training command)."""
    if func is None:
        return functools.partial(user_errors, rerun=rerun, kept=kept)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            _exit_with(err)
        except KeyboardInterrupt:
            print(f"interrupted: {kept}; {rerun.removeprefix('then ')}", file=sys.stderr)
            sys.exit(130)
        except Exception as err:
            line = storage_error(err, rerun)
            if line is None and _from_store_library(err):  # an object-store fault no store call named
                line = remote_error(err, None, rerun=rerun)
            if line is None:
                raise
            _exit_with(line)

    return wrapper
