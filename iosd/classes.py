"""Class sets, seen/unseen splits and detector synonyms: read from one data file.

A user's own split is a JSON file ``{"seen": [...], "unseen": [...]}``, optionally with
``"synonyms": {"class": ["other name", ...]}`` (more prompts for a text-prompted teacher).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from iosd.errors import UserError

SPLITS = (1, 2, 3)


@dataclass(frozen=True)
class ClassSplit:
    """The classes of one split: ``seen`` ones train the head, ``unseen`` ones test transfer."""

    name: str
    split: int
    seen: tuple[str, ...]
    unseen: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.seen + self.unseen

    def subset(self, which: str) -> tuple[str, ...]:
        """Classes of ``which`` in {"seen", "unseen", "all"}."""
        if which == "seen":
            return self.seen
        if which == "unseen":
            return self.unseen
        if which == "all":
            return self.all
        raise UserError(f"unknown subset {which!r}", "use seen, unseen or all")

    def to_json(self) -> dict:
        return {"name": self.name, "split": self.split, "seen": list(self.seen), "unseen": list(self.unseen)}

    @classmethod
    def from_json(cls, data: dict) -> ClassSplit:
        return cls(data["name"], int(data["split"]), tuple(data["seen"]), tuple(data["unseen"]))


@cache
def _data() -> dict:
    return json.loads(resources.files("iosd").joinpath("data/classes.json").read_text())


def class_sets() -> tuple[str, ...]:
    """Names of the built-in class sets."""
    return tuple(_data()["sets"])


def synonyms() -> dict[str, str]:
    """VOC spelling -> COCO detector label."""
    return dict(_data()["synonyms"])


def canonical(name: str) -> str:
    """The detector spelling of a class name (VOC names map to COCO labels)."""
    key = name.strip().lower()
    return synonyms().get(key, key)


def load_split(classes: str, split: int) -> ClassSplit:
    """A built-in class set by name, or a user's JSON file with seen/unseen lists."""
    if split not in SPLITS:
        raise UserError(f"split {split} is outside 1..3", "pass --split 1, 2 or 3")
    sets = _data()["sets"]
    if classes in sets:
        entry = sets[classes]
        unseen = tuple(entry["unseen"][str(split)])
        seen = tuple(c for c in entry["classes"] if c not in unseen)
        return ClassSplit(classes, split, seen, unseen)
    path = Path(classes)
    if not path.suffix and not path.exists():
        raise UserError(f"unknown class set {classes!r}", f"use one of {', '.join(sets)} or a JSON file with seen/unseen lists")
    return _load_file(path, split)


def _load_file(path: Path, split: int) -> ClassSplit:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"class file {path} does not exist", "pass an existing JSON file with seen/unseen lists") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"class file {path} is not readable JSON: {err}", 'write {"seen": [...], "unseen": [...]}') from None
    if not isinstance(data, dict) or not isinstance(data.get("seen"), list) or not isinstance(data.get("unseen", []), list):
        raise UserError(f"class file {path} lacks a 'seen' list", 'write {"seen": [...], "unseen": [...]}')
    seen = tuple(str(c).strip() for c in data["seen"])
    unseen = tuple(str(c).strip() for c in data.get("unseen", []))
    bad = [c for c in seen + unseen if not c]
    if bad or not seen:
        raise UserError(f"class file {path} has an empty class name or no seen class", "list non-empty names")
    both = sorted(set(seen) & set(unseen))
    if both:
        raise UserError(f"class file {path} lists {', '.join(both)} as both seen and unseen", "keep each class in one list")
    return ClassSplit(path.stem, split, seen, unseen)


def prompt_synonyms(classes: str) -> dict[str, list[str]]:
    """More prompts per class for a text-prompted teacher: a class file's optional
    ``"synonyms": {"class": ["other name", ...]}``, or, for a built-in set, the COCO spelling of
    each VOC name (aeroplane: airplane). Empty for anything else."""
    sets = _data()["sets"]
    if classes in sets:
        names = set(sets[classes]["classes"])
        return {voc: [coco] for voc, coco in synonyms().items() if voc in names and coco != voc}
    path = Path(classes)
    if path.suffix != ".json" or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    extra = data.get("synonyms") if isinstance(data, dict) else None
    if extra is None:
        return {}
    if not isinstance(extra, dict) or not all(isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v) for v in extra.values()):
        raise UserError(f"class file {path}: 'synonyms' is not a mapping of class names to lists of names", 'write "synonyms": {"class": ["other name", ...]}')
    known = set(data.get("seen") or []) | set(data.get("unseen") or [])
    unknown = sorted(set(extra) - {str(c).strip() for c in known})
    if unknown:
        raise UserError(f"class file {path}: synonyms for {', '.join(map(repr, unknown))}, which it does not list", "give synonyms only for classes in seen or unseen")
    return {str(k).strip(): [s.strip() for s in v] for k, v in extra.items()}


def check_names(names: list[str], split: ClassSplit) -> None:
    """Refuse class names that the split does not know."""
    unknown = [n for n in names if n not in split.all]
    if unknown:
        raise UserError(f"unknown class name(s) {', '.join(map(repr, unknown))} for {split.name}", f"choose from: {', '.join(split.all)}")
