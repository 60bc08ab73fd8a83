"""``iosd-synth``'s engine: a trained head turns its diffusion model into a labelled dataset.

GD's second protocol: once the head segments classes it never saw, generated images of any
class, labelled by the head alone (no teacher), train a standard segmenter. Images come from
the checkpoint's own generation config (model, recipe, prompt templates, feature capture),
or, when the head was trained on the built-in shapes world, from that world rendered and
passed once through the UNet as iosd-gen does. Every mask passes quality control
(``iosd.pipeline.quality``) and the verdicts are kept in ``synth.json``.

Image ``i`` of the plan (class ``i // images_per_class``) draws its seed and prompt from a
random generator keyed by (seed, stream, i) only, so any rank and any rerun makes the same
image. Work is done in chunks of ``chunk_size`` images: a chunk's files are written, then its
record (``.synth-parts/chunk-N.json``) atomically; a rerun skips chunks with a record. Under
torchrun rank r takes chunks r::world, and rank 0 assembles the set-wide files after a barrier.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from iosd.errors import UserError
from iosd.export_layout import FORMATS, IMAGE_KEY, PARTS, PREVIEW, REPORT
from iosd.featstore import DEFAULT_CODEC
from iosd.manifest import sha256_file, write_json_atomic
from iosd.pipeline.export import Labelled, make_export
from iosd.pipeline.prompts import GD_TEMPLATE, GD_TEMPLATE_2, OBJECTS, PromptSpec, make_prompt
from iosd.pipeline.quality import Limits, judge_mask, summarise
from iosd.pipeline.tasks import resolve_task, task_note
from iosd.prechecks import check_class_names, check_generation, check_writable
from iosd.progress import stage_progress

SYNTH_STREAM = 2  # seeds apart from iosd-gen's training (0) and test (1) streams
SETTINGS_NAME = "settings.json"  # in PARTS: marks the directory as this synth's, from its first moment
PREVIEW_PER_CHUNK = 2
PREVIEW_TILES = 16
# Fields that never change what is written (batch stays: batched kernels round differently).
NON_IDENTITY = ("checkpoint", "out", "device", "quiet", "task")


def read_class_names(text: str) -> list[str]:
    """Class names from ``--classes``: a file with one name per line, or a comma-separated list."""
    path = Path(text)
    if "," not in text and path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--classes file {path} is not readable text ({err})", "write one class name per line") from None
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        where = f"file {path}"
    else:
        names = [n.strip() for n in text.split(",")]
        where = repr(text)
        if any(not n for n in names):
            raise UserError(f"--classes {where} has an empty class name", 'pass names separated by commas, e.g. "unicorn,lion dance"')
    if not names:
        raise UserError(f"--classes {where} names no class", "write one class name per line")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--classes {where} lists {', '.join(map(repr, twice))} more than once", "name each class once")
    return names


@dataclass
class SynthConfig:
    """Options of one synthesized dataset."""

    checkpoint: str
    classes: list[str]
    images_per_class: int
    out: str
    objects: str = "1"
    format: str = "coco"
    min_confidence: float = 0.0
    min_agreement: float | None = None
    min_area: float = 0.0
    max_area: float = 1.0
    threshold: float = 0.5
    seed: int = 0
    batch: int = 4
    chunk_size: int = 16
    device: str = "auto"
    quiet: bool = False
    task: str | None = None  # "I/N", "N" or "auto" (iosd.pipeline.tasks; None: one process): which chunks this process makes
    teacher: str | None = None  # --min-agreement's teacher (pipeline/teachers); None: the checkpoint's

    def check(self) -> SynthConfig:
        if self.format not in FORMATS:
            raise UserError(f"unknown --format {self.format!r}", f"use one of {', '.join(FORMATS)}")
        if self.objects not in OBJECTS:
            raise UserError(f"--objects {self.objects!r} is not one of {', '.join(OBJECTS)}", "pass --objects 1, 2 or mix")
        for name in ("images_per_class", "batch", "chunk_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})", "pass a number > 0")
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold {self.threshold} is outside (0, 1)", "pass e.g. 0.5")
        if not self.classes:
            raise UserError("no class to synthesize", 'pass --classes "unicorn,lion dance"')
        check_class_names(self.classes)
        self.limits()
        return self

    def limits(self) -> Limits:
        return Limits(self.min_confidence, self.min_agreement, self.min_area, self.max_area).check()

    def identity(self, weights: dict) -> dict:
        """What the output depends on: the settings and the head's weights (not where they live)."""
        unset = ("teacher",) if self.teacher is None else ()  # outputs from before --teacher keep theirs
        return {**{k: v for k, v in asdict(self).items() if k not in NON_IDENTITY and k not in unset}, "head": weights}


@dataclass
class PlannedImage:
    index: int
    key: str
    seed: int
    prompt: str
    names: list[str]


@dataclass
class Plan:
    """Image ``i`` shows class ``classes[i // per_class]``, with a partner as ``objects`` says."""

    classes: list[str]
    per_class: int
    spec: PromptSpec
    seed: int
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = len(self.classes) * self.per_class

    def image(self, index: int) -> PlannedImage:
        rng = np.random.default_rng([self.seed, SYNTH_STREAM, index])
        seed = int(rng.integers(2**31 - 1))
        prompt, names, _ = make_prompt(rng, tuple(self.classes), self.spec, query=self.classes[index // self.per_class])
        return PlannedImage(index, IMAGE_KEY.format(index=index), seed, prompt, names)


def check_out(out: Path, identity: dict) -> bool:
    """Refuse an --out that holds anything but this synth (same settings); True when resuming."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file", "choose a directory")
    if not out.exists() or not any(out.iterdir()):
        return False
    marker = out / PARTS / SETTINGS_NAME
    if not marker.exists() and _just_opened(out):
        return False  # another task started at the same time and is writing the marker
    if not marker.exists():
        raise UserError(f"--out {out} holds files that are not an iosd-synth export", "choose a new or empty directory")
    try:
        old = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{marker} is corrupt", "delete the directory to start over, or choose another --out") from None
    if old != identity:
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        raise UserError(f"--out {out} holds a synth of other settings (differs in: {', '.join(diff)})", "choose another --out, or delete it to start over")
    return True


def _just_opened(out: Path) -> bool:
    """Whether ``out`` holds only what another task's ``_prepare`` makes before its marker lands."""
    return all(e.name == PARTS for e in out.iterdir()) and all(e.name.startswith(".") for e in (out / PARTS).iterdir())


def chunk_record_path(out: Path, chunk: int) -> Path:
    return out / PARTS / f"chunk-{chunk:06d}.json"


class Synthesizer:
    """One synthesized dataset in one output directory (this rank's share of it)."""

    def __init__(self, cfg: SynthConfig) -> None:
        from iosd.pipeline.generate import dist_env
        from iosd.train.checkpoint import MODEL_NAME, read_checkpoint

        self.cfg = cfg.check()
        self.limits = cfg.limits()
        self.run_dir = Path(cfg.checkpoint)
        self.info, weights_dir = read_checkpoint(self.run_dir)
        self.gen = self.info.get("generation") or {}
        if not self.gen or not self.info.get("layout") or not self.info.get("embedding"):
            raise UserError(f"{self.run_dir} does not record the model and features its head was trained on", "retrain with this iosd")
        self.source = self.gen.get("source") or "diffusion"
        if self.source == "shapes":
            from iosd.pipeline.shapes import SHAPE_NAMES

            unknown = [n for n in cfg.classes if n not in SHAPE_NAMES]
            if unknown:
                raise UserError(f"{self.run_dir} was trained on the shapes world, which has no class {', '.join(map(repr, unknown))}", f"choose from: {', '.join(SHAPE_NAMES)}")
        self.weights = {"sha256": sha256_file(weights_dir / MODEL_NAME), "step": int(self.info.get("step", 0))}
        self.identity = cfg.identity(self.weights)
        self.out = Path(cfg.out)
        check_out(self.out, self.identity)  # before any model is loaded: a bad --out costs nothing
        check_writable(self.out)
        teacher_gen = self.gen if cfg.teacher is None or cfg.teacher == (self.gen.get("teacher") or "mmdet") else {**self.gen, "teacher": cfg.teacher, "teacher_model": None}
        check_generation(teacher_gen, teacher=self.source != "shapes" and cfg.min_agreement is not None)
        spec = PromptSpec(cfg.objects, self.gen.get("template") or GD_TEMPLATE, self.gen.get("template2") or GD_TEMPLATE_2).check()
        self.plan = Plan(list(cfg.classes), cfg.images_per_class, spec, cfg.seed)
        self.n_chunks = math.ceil(self.plan.total / cfg.chunk_size)
        self.rank, self.world = dist_env()
        self.task = resolve_task(cfg.task)  # independent tasks: no process group between them
        self.size = int(self.gen["resolution"])

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the head, the model and the teacher; check every class name has tokens; then
        (rank 0) make the output directory ours. Nothing is written before this succeeds."""
        from iosd.pipeline.capture import FeatureCapture
        from iosd.pipeline.generate import _on_rank0, load_configured
        from iosd.pipeline.text import QuerySpec, class_embeddings
        from iosd.train.checkpoint import load_head

        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        # a head trained on projected features comes wrapped with its basis: its info's layout is
        # then the raw one it takes, so capture and the shards export use raw UNet features
        head, self.info = load_head(self.run_dir, "cpu")
        self.layers = [p for p, _ in self.info["layout"]["layers"]]
        self.loaded = load_configured(self.gen, self.cfg.device)
        self.head = head.to(self.loaded.device)
        query = QuerySpec.from_record(self.info["embedding"])
        embeddings = class_embeddings(self.loaded.pipe, list(self.cfg.classes), query)
        if embeddings.shape[1] != int(self.info["layout"]["embedding_dim"]):
            raise UserError(f"the model's class embeddings are {embeddings.shape[1]}-d but the head takes {self.info['layout']['embedding_dim']}-d", "the checkpoint's model changed: retrain")
        self.embeddings = dict(zip(self.cfg.classes, embeddings, strict=True))
        self.teacher = self._teacher()
        self.capture = FeatureCapture(self.loaded.pipe.unet, self.layers, halves=self.gen.get("halves") or "cond").__enter__()
        self.export = make_export(self.cfg.format, self.out, self.cfg.classes, **self._shards_options())
        _on_rank0(self.world, self.rank, self._prepare)

    def _teacher(self):
        """The configured mmdet teacher, for agreement with diffusion images; only when
        --min-agreement asks for it (the shapes world's exact masks need none)."""
        if self.source == "shapes" or self.cfg.min_agreement is None:
            return None
        from iosd.pipeline.teachers import build_teacher, options_from_config
        from iosd.recipes import CPU_STAND_INS

        g = self.gen
        tiny = g.get("model") in CPU_STAND_INS and not g.get("teacher_config") and not g.get("teacher_checkpoint") and not g.get("teacher_model")
        if self.cfg.teacher is not None and self.cfg.teacher != (g.get("teacher") or "mmdet"):
            # another teacher than the shards': its own defaults, none of the shards' teacher options
            g = {k: v for k, v in g.items() if k not in ("score_thr", "mask_thr", "teacher_config", "teacher_checkpoint", "teacher_model")}
            g["teacher"] = self.cfg.teacher
            if tiny:  # random weights: no confidence to threshold on, as the tiny teacher
                g["score_thr"] = 0.0
        options = options_from_config({**g, "resolution": self.size}, str(self.loaded.device), tiny=tiny)
        if options.name == "mmdet" and options.mask_thr is None:
            options.mask_thr = 0.5
        return build_teacher(options)

    def _teacher_record(self) -> dict | None:
        """What the agreement was measured against (None: not measured)."""
        if self.source == "shapes":
            return {"kind": "exact", "source": "shapes"}
        return self.teacher.describe() if self.teacher is not None else None

    def _shards_options(self) -> dict:
        if self.cfg.format != "shards":
            return {}
        return {"header": self.shard_header(), "n_chunks": self.n_chunks, "feature_dtype": self.gen.get("feature_dtype") or "float16", "codec": self.gen.get("codec") or DEFAULT_CODEC}

    def shard_header(self) -> dict:
        """The shard manifest's fixed fields, from what the checkpoint recorded of its own shards."""
        from iosd.layers import layer_key

        features = {k: v for k, v in (self.info.get("features") or {}).items() if k not in ("stored_bytes_per_sample", "projection")}
        features["layers"] = [{"path": p, "key": layer_key(p), "shape": list(s)} for p, s in self.info["layout"]["layers"]]
        return {
            "kind": "iosd-shards",
            "recipe": (self.info.get("recipe") or {}).get("shards"),
            "identity": self.identity,
            "config": {**self.gen, "out": str(self.out), "seed": self.cfg.seed, "objects": self.cfg.objects, "images_per_class": self.cfg.images_per_class},
            "classes": {"name": "synth", "split": 1, "seen": list(self.cfg.classes), "unseen": []},
            "subset": "seen",
            "image_size": [self.size, self.size],
            "model": self.info.get("model"),
            "features": features,
            "embedding": self.info["embedding"],
            "teacher": {"kind": "iosd-head", "checkpoint": str(self.run_dir), **self.weights, "threshold": self.cfg.threshold, "limits": self.limits.to_json()},
            "masks_meaningful": True,
            "notes": ["masks are a trained head's predictions (iosd-synth), not a teacher's"],
        }

    def _prepare(self) -> None:
        try:
            (self.out / PARTS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot write to --out {self.out} ({err.strerror})", "choose a writable directory") from None
        write_json_atomic(self.out / PARTS / SETTINGS_NAME, self.identity)
        self.export.prepare()

    def close(self) -> None:
        self.capture.__exit__(None, None, None)

    # -- one batch -------------------------------------------------------------------------
    @torch.no_grad()
    def label(self, batch: list[PlannedImage]) -> list[Labelled]:
        """Generate (or render) a batch, segment each image's classes with the head, judge each mask."""
        from iosd.evaluate.scoring import head_inputs
        from iosd.pipeline.generate import IMAGE_SOURCE_T
        from iosd.pipeline.sources import diffuse, shapes_world

        prompts, seeds, names = [p.prompt for p in batch], [p.seed for p in batch], [p.names for p in batch]
        g = self.gen
        if self.source == "shapes":
            t = g.get("feature_t") if g.get("feature_t") is not None else IMAGE_SOURCE_T
            out = shapes_world(self.loaded, self.capture, prompts, names, seeds, size=self.size, feature_t=int(t))
        else:
            out = diffuse(self.loaded, self.capture, prompts, seeds, steps=int(g["steps"]), size=self.size, guidance=float(g["guidance"]), feature_step=int(g["feature_step"]), feature_t=g.get("feature_t"))
        feats = {p: t.float() for p, t in out.features.items()}  # stay on the device for the head
        items = [{"features": {p: feats[p][b] for p in self.layers}, "queries": torch.from_numpy(np.stack([self.embeddings[n] for n in plan.names])), "names": plan.names} for b, plan in enumerate(batch)]
        logits = self.head(*head_inputs(items, self.layers, str(self.loaded.device))).float()
        probs = torch.sigmoid(F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=False)).cpu().numpy()
        teacher = self._teacher_masks(out, names)
        result = []
        for b, plan in enumerate(batch):
            n = len(plan.names)
            p = probs[b, :n]
            masks = p > self.cfg.threshold
            verdicts = [judge_mask(name, p[i], masks[i], teacher[b][i], self.limits) for i, name in enumerate(plan.names)]
            keep_feats = {k: v[b].cpu().numpy() for k, v in feats.items()} if self.cfg.format == "shards" else {}
            emb = np.stack([self.embeddings[name] for name in plan.names])
            result.append(Labelled(plan.index, plan.key, out.images[b], plan.prompt, plan.seed, plan.names, p.astype(np.float32), masks, verdicts, emb, keep_feats))
        return result

    def _teacher_masks(self, out, names: list[list[str]]) -> list[list[np.ndarray | None]]:
        """Per image and class the teacher's mask, or None where there is none to agree with."""
        if out.exact_masks is not None:
            return [list(m) for m in out.exact_masks]
        if self.teacher is None:
            return [[None] * len(n) for n in names]
        known = [[c for c in n if self.teacher.knows(c)] for n in names]
        labels = self.teacher.label(list(out.images), known)
        result = []
        for n, k, labs in zip(names, known, labels, strict=True):
            by_name = {c: lab.mask for c, lab in zip(k, labs, strict=True)}
            result.append([by_name.get(c) for c in n])
        return result

    # -- one chunk -------------------------------------------------------------------------
    def chunk_indices(self, chunk: int) -> range:
        start = chunk * self.cfg.chunk_size
        return range(start, min(self.plan.total, start + self.cfg.chunk_size))

    def write_chunk(self, chunk: int, advance=None) -> dict:
        """Label one chunk, write its files through the format's writer, then its record."""
        from iosd.viz import overlay, save_png_atomic

        planned = [self.plan.image(i) for i in self.chunk_indices(chunk)]
        labelled: list[Labelled] = []
        for start in range(0, len(planned), self.cfg.batch):
            labelled += self.label(planned[start : start + self.cfg.batch])
            if advance is not None:
                advance(len(planned[start : start + self.cfg.batch]))
        exported = self.export.write_chunk(chunk, labelled)
        preview = []
        for item in [x for x in labelled if x.kept][:PREVIEW_PER_CHUNK]:
            kept = [i for i, v in enumerate(item.verdicts) if v.kept]
            tile = overlay(item.image, item.masks[kept], [f"{item.names[i]} {item.verdicts[i].confidence:.2f}" for i in kept])
            name = f"preview-{item.key}.png"
            save_png_atomic(Image.fromarray(tile), self.out / PARTS / name)
            preview.append({"file": name, "title": f"{item.key}: {item.prompt}"})
        images = [{"key": x.key, "index": x.index, "prompt": x.prompt, "seed": x.seed, "kept": x.kept, "classes": [v.to_json() for v in x.verdicts]} for x in labelled]
        record = {"chunk": chunk, "images": images, "export": exported, "preview": preview}
        write_json_atomic(chunk_record_path(self.out, chunk), record)
        return record

    def finished(self) -> set[int]:
        """Chunks whose record exists (written last, after the chunk's files)."""
        return {c for c in range(self.n_chunks) if chunk_record_path(self.out, c).exists()}

    # -- the whole set -----------------------------------------------------------------------
    def run(self) -> dict:
        """Write this rank's missing chunks; rank 0 then assembles the set. Returns synth.json (rank 0) or {}."""
        from iosd.pipeline.generate import _barrier

        self.setup()
        try:
            done = self.finished()
            owned = [c for c in range(self.n_chunks) if self.task.owns(c, self.rank, self.world)]
            mine = [c for c in owned if c not in done]
            if self.rank == 0:
                task_note(self.task, "chunks", len(owned), self.n_chunks)
            todo = sum(len(self.chunk_indices(c)) for c in mine)
            with stage_progress(self.rank == 0 and not self.cfg.quiet, todo, str(self.out), "synth") as advance:
                for chunk in mine:
                    self.write_chunk(chunk, advance)
        finally:
            self.close()
        _barrier(self.world)
        report = self._finish() if self.rank == 0 else {}
        _barrier(self.world)
        return report

    def _finish(self) -> dict:
        """Assemble the set (one task), or, for one of several independent tasks, when this
        task finds every chunk's record present; otherwise {} (a later task assembles it; a
        rerun of any task's command does too)."""
        if self.task.count > 1 and len(self.finished()) < self.n_chunks:
            if not self.cfg.quiet:
                print(f"note: task {self.task.label()} is done; {self.n_chunks - len(self.finished())} of {self.n_chunks} chunks are still missing: the last task to finish writes {REPORT} (or rerun any task's command)", file=sys.stderr)
            return {}
        return self.assemble()

    def assemble(self) -> dict:
        """The set-wide files from every chunk's record: the format's index, preview.png, synth.json."""
        from iosd.viz import grid, save_png_atomic

        records = []
        for chunk in range(self.n_chunks):
            try:
                records.append(json.loads(chunk_record_path(self.out, chunk).read_text()))
            except (OSError, json.JSONDecodeError):
                raise UserError(f"chunk {chunk} of {self.out} is missing or corrupt", "rerun the same command to redo it") from None
        files = self.export.finish([r["export"] for r in records])
        tiles = [t for r in records for t in r["preview"]][:PREVIEW_TILES]
        if tiles:
            sheet = grid([_read_rgb(self.out / PARTS / t["file"]) for t in tiles], [t["title"] for t in tiles])
        else:
            sheet = grid([np.full((self.size, self.size, 3), 255, np.uint8)], ["no image kept"])
        save_png_atomic(sheet, self.out / PREVIEW)
        images = [image for r in records for image in r["images"]]
        report = {
            "kind": "iosd-synth",
            "settings": self.identity,
            "checkpoint": {"path": str(self.run_dir), **self.weights, "recipe": (self.info.get("recipe") or {}).get("name"), "head": (self.info.get("head") or {}).get("kind")},
            "generation": {"source": self.source, "model": self.gen.get("model"), "resolution": self.size, "template": self.plan.spec.template, "template2": self.plan.spec.template2},
            "agreement_teacher": self._teacher_record(),
            "classes": list(self.cfg.classes),
            "format": self.cfg.format,
            "files": {**files, "preview": PREVIEW},
            "summary": summarise(images),
            "images": images,
            "complete": True,
        }
        write_json_atomic(self.out / REPORT, report)
        return report


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def synthesize(cfg: SynthConfig) -> dict:
    """Run one synth to the end (resuming what is there); synth.json's content on rank 0."""
    from iosd.store import is_remote

    if is_remote(cfg.out):
        return _synthesize_to_store(cfg)
    return Synthesizer(cfg).run()


def _synthesize_to_store(cfg: SynthConfig) -> dict:
    """``--out s3://...``: the export is built in a local staging directory (iosd.store.staging_dir)
    that first takes what the URL already holds (so a rerun anywhere resumes from its chunk
    records), then every file is uploaded whole: data, then records, then the set-wide files,
    synth.json last. Chunks finished before a failure are uploaded too, when the store answers."""
    import dataclasses

    from iosd.store import RemoteStore, staging_dir

    store = RemoteStore(cfg.out)
    stage = staging_dir(cfg.out)
    store.pull(stage)
    try:
        report = Synthesizer(dataclasses.replace(cfg, out=str(stage))).run()
    except BaseException:
        try:
            store.push(stage, last=(REPORT,))
        except Exception:
            pass  # the store itself may be what failed: the first error is the one to report
        raise
    store.push(stage, last=(REPORT,))
    return report
