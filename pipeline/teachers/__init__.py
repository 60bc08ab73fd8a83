"""The teacher seam: one registry from a --teacher name to the module that builds it.

Every teacher takes images and, per image, class names, and returns per class one mask (by the
recipe's --gt rule) and a score (``TeacherLabel``); the generate stage's filter does the rest.
``mmdet`` is the papers' Mask R-CNN (COCO labels, or the shapes world's for the trained CPU-world
teacher ``--teacher-config world-maskrcnn``; needs mmcv); the others are prompted with
the class names themselves, so any vocabulary works, and need only transformers. Model ids,
revisions and threshold defaults with their sources live in ``iosd/data/teachers.json``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from iosd.choices import DEFAULT_TEACHER, TEACHER_NAMES
from iosd.errors import UserError
from iosd.pipeline.teachers.base import Teacher, TeacherLabel

__all__ = ["BUILDERS", "DEFAULT_TEACHER", "Teacher", "TeacherLabel", "TeacherOptions", "build_teacher", "teacher_spec", "threshold_defaults"]

# name -> module with ``build(TeacherOptions) -> Teacher``; imported only when that teacher is built
BUILDERS = {
    "mmdet": "iosd.pipeline.teachers.mmdet",
    "sam3": "iosd.pipeline.teachers.sam3",
    "grounding-dino+sam2": "iosd.pipeline.teachers.grounding_dino_sam2",
    "owlv2+sam": "iosd.pipeline.teachers.owlv2_sam",
}
assert tuple(BUILDERS) == TEACHER_NAMES


@dataclass
class TeacherOptions:
    """What a teacher is built from: the CLI's teacher options, resolved."""

    name: str = DEFAULT_TEACHER
    device: str = "cpu"
    score_thr: float | None = None  # None: the teacher's default (teachers.json / the recipe)
    mask_thr: float | None = None
    gt: str = "top"
    tiny: bool = False  # random-weight tiny config of the same classes, built offline
    image_size: int | None = None
    config: str | None = None  # mmdet only: --teacher-config
    checkpoint: str | None = None  # mmdet only: --teacher-checkpoint
    models: tuple[str, ...] = ()  # text teachers: --teacher-model, per component (detector, segmenter)
    synonyms: dict[str, list[str]] = field(default_factory=dict)  # class -> more prompts (split file)


@cache
def _data() -> dict:
    return json.loads(resources.files("iosd").joinpath("data/teachers.json").read_text())["teachers"]


def check_name(name: str) -> str:
    """The teacher name, or one line listing the known ones."""
    if name not in BUILDERS:
        raise UserError(f"unknown teacher {name!r}", f"use one of {', '.join(BUILDERS)}")
    return name


def teacher_spec(name: str) -> dict[str, Any]:
    """The teachers.json entry of ``name``: its models (id, revision, input size) and thresholds."""
    return _data()[check_name(name)]


def threshold_defaults(name: str) -> dict[str, dict]:
    """{option: {value, source}} a text-prompted teacher sets where the user gave none (mmdet: {})."""
    return dict(teacher_spec(name)["thresholds"])


def unset_teacher_fields(cfg: Any) -> tuple[str, ...]:
    """The teacher options left unset (None): kept out of a set's identity and manifest config,
    so sets from before --teacher and --labels (and every mmdet set) keep the same bytes and identity."""
    return tuple(k for k in ("teacher", "teacher_model", "labels") if getattr(cfg, k, None) is None)


def split_models(teacher_model: str | None) -> tuple[str, ...]:
    return tuple(m.strip() for m in (teacher_model or "").split(",") if m.strip())


def check_teacher_choice(teacher: str | None, config: str | None, checkpoint: str | None, teacher_model: str | None) -> None:
    """The teacher name is known and its options fit it: --teacher-config/--teacher-checkpoint
    are mmdet's, --teacher-model a text-prompted teacher's."""
    name = check_name(teacher or DEFAULT_TEACHER)
    if name == DEFAULT_TEACHER and teacher_model:
        raise UserError("--teacher-model is for the text-prompted teachers, not mmdet", "pass --teacher-config/--teacher-checkpoint for mmdet, or --teacher sam3 (or another text-prompted teacher)")
    if name != DEFAULT_TEACHER and (config or checkpoint):
        raise UserError(f"--teacher-config/--teacher-checkpoint are mmdet's; the {name} teacher takes --teacher-model", f"drop them, or pass --teacher-model with the {name} teacher's model ids or directories")
    if name != DEFAULT_TEACHER:
        from iosd.pipeline.teachers.base import resolve_models

        resolve_models(name, teacher_spec(name), split_models(teacher_model))


def check_teacher_models(teacher: str | None, teacher_model: str | None) -> None:
    """Each model of a text-prompted teacher is there (a local directory with config, weights and
    tokenizer; offline, a hub id in the cache): one line before any model loads."""
    from iosd.pipeline.teachers.base import check_model_files, resolve_models

    name = check_name(teacher or DEFAULT_TEACHER)
    for _, model, location, _ in resolve_models(name, teacher_spec(name), split_models(teacher_model)):
        check_model_files(location, tokenizer="max_text_tokens" in model, teacher=name)


def apply_teacher_defaults(given: Any, filled: Any, resolved: Any) -> None:
    """A text-prompted teacher's threshold defaults (teachers.json) for the options the user left
    unset, recorded with their sources as the recipe's are (--show-config, the manifest)."""
    name = check_name(filled.teacher)
    for option, setting in threshold_defaults(name).items():
        if not hasattr(filled, option) or getattr(given, option, None) is not None:
            continue
        setattr(filled, option, setting["value"])
        resolved.origin.setdefault(option, {"from": "recipe"}).update(value=setting["value"], source=f"teacher {name}: {setting['source']}")


def options_from_config(gen: dict, device: str, *, tiny: bool) -> TeacherOptions:
    """The teacher a generation config (GenConfig as a dict, or a manifest's "config") names."""
    from iosd.classes import prompt_synonyms

    name = check_name(gen.get("teacher") or DEFAULT_TEACHER)
    return TeacherOptions(
        name=name,
        device=device,
        score_thr=gen.get("score_thr"),
        mask_thr=gen.get("mask_thr"),
        gt=gen.get("gt") or "top",
        tiny=tiny,
        image_size=gen.get("resolution"),
        config=gen.get("teacher_config"),
        checkpoint=gen.get("teacher_checkpoint"),
        models=split_models(gen.get("teacher_model")),
        synonyms=prompt_synonyms(str(gen.get("classes") or "")) if name != DEFAULT_TEACHER else {},
    )


def build_teacher(options: TeacherOptions) -> Teacher:
    """Build the named teacher; each module raises one-line UserErrors for missing files."""
    module = importlib.import_module(BUILDERS[check_name(options.name)])
    return module.build(options)
