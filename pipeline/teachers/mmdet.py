"""The papers' teacher behind the seam: MMDetection's Mask R-CNN (pipeline/teacher.py).

Its labels are COCO's (through the VOC synonym map), or those its checkpoint names (the trained
CPU-world teacher, ``--teacher-config world-maskrcnn``: the shapes world's classes, files checked
against their sha256 first, iosd/world_teachers.py); it refuses other class names and needs mmcv
with ops (scripts/install-mmcv.sh). Built exactly as before the seam, so its shards are
byte-identical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iosd.pipeline.teacher import MaskRCNNTeacher
    from iosd.pipeline.teachers import TeacherOptions


def build(options: TeacherOptions) -> MaskRCNNTeacher:
    """The Mask R-CNN of --teacher-config/--teacher-checkpoint (tiny: random-weight r50)."""
    from iosd.pipeline.teacher import build_teacher

    return build_teacher(
        options.config,
        options.checkpoint,
        device=options.device,
        score_thr=options.score_thr,
        mask_thr=0.5 if options.mask_thr is None else options.mask_thr,
        tiny=options.tiny,
        image_size=options.image_size,
        gt=options.gt,
    )
