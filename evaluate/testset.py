"""Test shards for iosd-eval, built with the generate stage's own machinery.

The test set mirrors the checkpoint's training shards (same model, features, template,
teacher) but draws every seen and unseen class, ``images_per_class`` one-object prompts
each (or two-object prompts grouped seen+seen / seen+unseen / unseen+unseen), from the
``test`` seed stream (disjoint from training), keeps every image (filtered ones are
counted, not scored) and stores DAAM's cross-attention maps.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from iosd.classes import ClassSplit
from iosd.errors import UserError
from iosd.manifest import feature_layout, layout_mismatch, read_manifest
from iosd.pipeline.generate import GenConfig
from iosd.schema import MANIFEST_NAME

# generation options a test set copies from the training shards
COPIED = ("recipe", "classes", "split", "source", "model", "revision", "template", "template2", "scheduler", "steps", "guidance", "resolution", "batch_size", "layers", "halves", "feature_dtype", "codec", "feature_t", "feature_step", "query_template", "query_pooling", "query_hidden", "gt", "teacher_config", "teacher_checkpoint", "teacher", "teacher_model", "score_thr", "mask_thr", "seed")


def default_test_dir(info: dict, objects: str = "1") -> Path:
    """Beside the training shards (``<dir>-test``), or shards/<classes><split>-test.

    Two-object test sets end in ``-test2``: ``objects`` is part of a shard set's identity,
    so the two kinds can never share a directory.
    """
    suffix = "-test" if objects == "1" else f"-test{objects}"
    spec = (info.get("shards") or {}).get("spec", "")
    from iosd.store import is_remote

    if is_remote(spec) and "{" not in spec and not spec.endswith((".json", ".tar")):
        return spec.rstrip("/") + suffix  # type: ignore[return-value]  # beside a set in an object store
    local = Path(spec)
    if spec and local.is_dir():
        return local.parent / f"{local.name}{suffix}"
    gen = info.get("generation") or {}
    return Path("shards") / f"{gen.get('classes', 'set')}{gen.get('split', '')}{suffix}"


def built_objects(manifest: dict) -> str:
    """Objects per prompt of a shard set ("1" for sets written before the option existed)."""
    return str((manifest.get("config") or {}).get("objects", "1"))


def check_images_per_class(manifest: dict, images_per_class: int, where: Path) -> None:
    """Refuse a finished test set of another size: its numbers would be reported as this one's."""
    built = (manifest.get("config") or {}).get("images_per_class")
    if built is not None and built != images_per_class:
        raise UserError(f"{where} holds {built} images per class, not --images-per-class {images_per_class}", f"pass --images-per-class {built}, or another --test-shards directory")


def check_objects(manifest: dict, objects: str, where: Path) -> None:
    """Refuse test shards built with another --objects: their images answer another question."""
    built = built_objects(manifest)
    if built != objects:
        raise UserError(f"{where} holds {built}-object test prompts, not --objects {objects}", f"pass --objects {built}, or another --test-shards directory (or none, to build one)")


def test_config(info: dict, out: Path, images_per_class: int, objects: str, device: str, teacher: str | None = None) -> GenConfig:
    gen = info.get("generation")
    if not gen:
        raise UserError("the checkpoint does not record how its shards were generated", "retrain with this iosd, or pass --test-shards built by iosd-gen")
    known = {f.name for f in fields(GenConfig)}
    options = {k: gen[k] for k in COPIED if k in gen and k in known}
    if teacher is not None and teacher != (gen.get("teacher") or "mmdet"):
        # ground truth from another teacher than the training shards': its own defaults and models
        for k in ("teacher_config", "teacher_checkpoint", "teacher_model", "score_thr", "mask_thr"):
            options.pop(k, None)
        options["teacher"] = None if teacher == "mmdet" else teacher
    return GenConfig(
        **options,
        subset="all",
        objects=objects,
        stream="test",
        images_per_class=images_per_class,
        shard_size=max(1, min(100, images_per_class * 4)),
        min_score=0.0,  # keep every mask: the confidence filter is applied when scoring
        daam=True,
        out=str(out),
        device=device,
    )


def ensure_test_shards(info: dict, test_dir: Path | None, images_per_class: int, objects: str, device: str, quiet: bool = False, teacher: str | None = None) -> Path:
    """The test shard directory, generated (or resumed) when it is missing or incomplete."""
    from iosd.store import is_remote, open_store

    out = test_dir if test_dir is not None and is_remote(test_dir) else Path(test_dir) if test_dir is not None else default_test_dir(info, objects)
    store = open_store(out)  # a directory or an object-store URL (s3://, ...)
    has_manifest = store.read_bytes(MANIFEST_NAME) is not None
    if has_manifest:
        manifest = read_manifest(out)
        check_objects(manifest, objects, out)
        check_images_per_class(manifest, images_per_class, out)
        built = (manifest.get("config") or {}).get("teacher") or "mmdet"
        if teacher is not None and teacher != built:
            raise UserError(f"{out} was labelled by the {built} teacher, not --teacher {teacher}", f"pass another --test-shards directory for {teacher}'s test set, or drop --teacher")
        if manifest.get("complete"):
            return out
    if test_dir is not None and store.has_entries() and not has_manifest:
        raise UserError(f"--test-shards {out} holds no {MANIFEST_NAME}", "point at shards built by iosd-gen/iosd-eval, or a new directory")
    from iosd.pipeline.generate import generate

    cfg = test_config(info, out, images_per_class, objects, device, teacher)
    cfg.quiet = quiet
    generate(cfg)
    return out


def check_compatible(info: dict, manifest: dict, split: ClassSplit, where: Path) -> None:
    """Refuse test shards whose split or feature layout differs from the checkpoint's."""
    test_split = ClassSplit.from_json(manifest["classes"])
    if (test_split.seen, test_split.unseen) != (split.seen, split.unseen):
        raise UserError(f"{where} holds {test_split.name} split {test_split.split}, the checkpoint was trained on {split.name} split {split.split}", "pass test shards of the checkpoint's split (or none, to build them)")
    diff = layout_mismatch(info["layout"], feature_layout(manifest))
    if diff:
        raise UserError(f"{where} does not match the checkpoint's features: {diff}", "build test shards with the checkpoint's model and --layers")
    if not manifest.get("complete"):
        raise UserError(f"{where} is incomplete", "rerun iosd-eval (it resumes building them) or iosd-gen")
