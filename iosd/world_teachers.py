"""The trained CPU-world teacher: a small Mask R-CNN that iosd trains on the shapes world.

The text-free mmdet teacher knows only COCO labels, and a random-weight one labels nothing
real; on a CPU, ``--source diffusion`` on the trained world needs a detector that knows the
world's shape classes and makes real mistakes. ``scripts/train-teacher.py`` trains it
(train/world_teacher.py); it ships as a directory (``config.py``, ``weights.pth`` and the
provenance record ``teacher.json`` with the sha256 of every file) under
``iosd/data/teachers/<name>/``. ``--teacher-config <name>`` (or the path of its config.py)
loads it after checking every file against that record. This module is the one definition of
their names, where they live and how they are verified; it never imports torch or mmdet.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from iosd.worlds import verify_directory

RECORD = "teacher.json"  # in each teacher directory; not itself hashed
CONFIG_FILE = "config.py"
WEIGHTS_FILE = "weights.pth"
# Shipped with the package; IOSD_TEACHERS_DIR points elsewhere (a retrained teacher).
TEACHERS_DIR = Path(os.environ.get("IOSD_TEACHERS_DIR") or str(resources.files("iosd").joinpath("data/teachers")))
TEACHERS: tuple[str, ...] = ("world-maskrcnn",)


def teacher_dir(name: str) -> Path:
    return TEACHERS_DIR / name


def rebuild_command(name: str) -> str:
    """The command that retrains teacher ``name`` into its shipped place."""
    return f"python scripts/train-teacher.py --name {name}"


def trained_teacher_root(config: str | os.PathLike) -> Path | None:
    """The trained-teacher directory a --teacher-config names: a shipped name, or a config.py
    beside a provenance record; None for anything else (mmdet zoo names, other files)."""
    text = os.fspath(config)
    if text in TEACHERS:
        return teacher_dir(text)
    path = Path(text).expanduser()
    if path.name == CONFIG_FILE and (path.parent / RECORD).is_file():
        return path.parent
    return None


def verify_teacher(root: Path, name: str | None = None) -> dict:
    """The provenance record of the teacher in ``root`` after checking every file's sha256
    against it; a missing, extra or altered file is a one-line error naming it and the rebuild
    command."""
    name = name or root.name
    fix = f"rebuild it with `{rebuild_command(name)}`, or restore the shipped files with git"
    return verify_directory(root, RECORD, f"the trained teacher {name!r}", fix)
