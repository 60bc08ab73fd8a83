"""Checks that need no model, run before any model loads (iosd-gen, -eval, -synth, -predict).

Loading a generator takes from seconds (the CPU stand-ins) to a minute (SDXL); a bad path, an
unwritable output or a class name without a token is reported before that, in one line. Each
concern has one function here; the checks made after loading (the tokenizer's own, the
loaded family's) stay as a second line of defence.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from iosd.errors import UserError

CHECKPOINT_FIX = "pass --teacher-checkpoint PATH to an existing .pth file or an http(s) URL"


def check_class_names(names, where: str = "--classes") -> None:
    """Every class name has a token: after stripping, at least one letter or digit (a name of
    only whitespace or punctuation gives the tokenizer nothing to embed)."""
    for name in names:
        if not any(ch.isalnum() for ch in str(name).strip()):
            raise UserError(f"{where}: class name {name!r} has no tokens", "give each class a name with letters or digits")


def is_url(location: str) -> bool:
    return urlparse(location).scheme in ("http", "https")


def check_teacher_checkpoint(checkpoint: str | None) -> Path | None:
    """A local --teacher-checkpoint must exist (a URL is fetched later); its path, or None."""
    if not checkpoint or is_url(checkpoint):
        return None
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"teacher checkpoint {checkpoint} does not exist", CHECKPOINT_FIX)
    return path


def check_teacher_config(config: str | None) -> None:
    """A --teacher-config is an existing file or a name of mmdet's model zoo (looked up offline
    in mmdet's packaged configs; without mmdet, only a name that is plainly a path is checked)."""
    if not config or Path(config).expanduser().is_file():
        return
    import importlib.util

    if importlib.util.find_spec("mmdet") is not None:
        from iosd.pipeline.teacher import resolve_config

        resolve_config(config)  # raises its one-line UserError for an unknown name
    elif config.endswith(".py") and not config.startswith("mmdet::"):
        raise UserError(f"teacher config {config} does not exist", "pass --teacher-config PATH to an existing .py file or an mmdet model-zoo name")


def check_teacher_files(config: str | None, checkpoint: str | None) -> None:
    check_teacher_checkpoint(checkpoint)
    check_teacher_config(config)


def check_writable(path: str | os.PathLike, flag: str = "--out") -> None:
    """``path`` is (or can be made) a directory this process writes in; nothing is created.

    The nearest existing ancestor decides: a regular file there can never hold a directory, and
    without write and search permission nothing can be made below it. A URL (s3://, gs://,
    ...) is probed instead: a zero-byte object put and deleted, so an unreachable endpoint, a
    missing bucket or refused credentials end in one line before any model loads.
    """
    from iosd.store import is_remote

    if is_remote(path):
        from iosd.store import RemoteStore

        RemoteStore(os.fspath(path)).make("", flag)
        return
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write to {flag} {out}: it is a file, not a directory", "choose a directory")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {flag} {out}: {existing} is a file, not a directory", "choose a writable directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {out}: no permission to write in {existing}", "choose a writable directory")


def stand_in_family(model: str | None) -> str | None:
    """The UNet family of a model known by name (the tiny stand-ins and the CPU worlds), else None."""
    from iosd.pipeline.models import TINY, TINY_SD1
    from iosd.worlds import WORLDS

    families = {TINY: "sdxl", TINY_SD1: "sd", **{name: world["family"] for name, world in WORLDS.items()}}
    return families.get(model or "")


def check_layers_family(layers: str | None, model: str | None) -> None:
    """A --layers preset of the other family than a model whose family its name tells."""
    from iosd.layers import check_family

    family = stand_in_family(model)
    if family is not None and layers:
        check_family(layers, family, str(model))


def check_generation(gen: dict, *, teacher: bool) -> None:
    """A checkpoint's recorded generation config, before iosd-synth/-predict load its model:
    its layer preset against a model known by name, and (``teacher``) its teacher's files."""
    check_layers_family(gen.get("layers"), gen.get("model"))
    if teacher and (gen.get("teacher") or "mmdet") == "mmdet":
        check_teacher_files(gen.get("teacher_config"), gen.get("teacher_checkpoint"))
    elif teacher and not (stand_in_family(gen.get("model")) and not gen.get("teacher_model")):
        from iosd.pipeline.teachers import check_teacher_models

        check_teacher_models(gen.get("teacher"), gen.get("teacher_model"))
