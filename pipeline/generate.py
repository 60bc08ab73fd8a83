"""The generate stage: prompts -> images + features -> teacher masks -> filter -> shards.

Shard ``i`` holds the first accepted candidates ``(i, 0), (i, 1), ...``, each drawn from a
random generator keyed by (seed, stream, i, attempt): its content depends only on the seed,
the config and its index, so ranks and resumed runs never coordinate beyond which indices
they own. Diffusion and the teacher run on the main thread; encoding (PNG, zarr, npz) and
writing run on worker threads, overlapping the next batch's diffusion.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from iosd.classes import ClassSplit, load_split
from iosd.errors import UserError
from iosd.featstore import DEFAULT_CODEC, encode_features
from iosd.layers import check_family, layer_key, resolve_layers
from iosd.pipeline.capture import FeatureCapture
from iosd.pipeline.filter import judge
from iosd.pipeline.models import LoadedModel, load_model
from iosd.pipeline.projecting import (
    check_projection_options,
    open_output,
    prepare_projection,
    stored_shapes,
)
from iosd.pipeline.prompts import PromptSpec, make_prompt
from iosd.pipeline.sources import (
    LABELLED_SOURCES,
    SOURCES,
    Produced,
    diffuse,
    labelled_world,
    renoised_pass,
    shapes_world,
    source_kind,
)
from iosd.pipeline.tasks import resolve_task, task_note
from iosd.pipeline.teacher import GT_RULES
from iosd.pipeline.teachers import (
    DEFAULT_TEACHER,
    apply_teacher_defaults,
    check_teacher_choice,
    check_teacher_models,
    unset_teacher_fields,
)
from iosd.pipeline.text import (
    QuerySpec,
    class_embeddings,
    coinciding_queries,
    embedding_spec,
    find_token_span,
)
from iosd.pipeline.tiny import TINY_RESOLUTION
from iosd.pipeline.writer import ShardSetWriter
from iosd.prechecks import (
    check_class_names,
    check_layers_family,
    check_teacher_files,
    check_writable,
)
from iosd.progress import stage_progress
from iosd.quantize import check_feature_dtype
from iosd.recipes import CPU_STAND_INS, HALVES, SCHEDULERS, Resolved, default_recipe, resolve
from iosd.schema import KEPT, PAIR_GROUPS, Sample, encode_sample, sample_key
from iosd.worlds import WORLD_SIDE, WORLDS

STREAMS = {"train": 0, "test": 1}  # test seeds never collide with training seeds
PAIRS_TAG = 0x70616972  # "pair": the two-object plan's own random stream, apart from candidates'
IMAGE_SOURCE_T = 50  # default re-noising timestep for image sources (GD: features near the end)
IMAGE_SOURCES = ("shapes", *LABELLED_SOURCES)  # sources with exact masks, features from a re-noised pass
LABELS = (None, "exact", "teacher")  # who labels an image source's images (--labels)
DEFAULT_SAMPLES = 1000  # --num-samples of generated sources (labelled sources: every usable image)

# Fields that do not change a shard's content: changing them never invalidates a set.
# (batch_size stays in the identity: batched kernels round differently per batch size.)
NON_IDENTITY = ("out", "device", "workers", "overwrite", "quiet", "task")


@dataclass
class GenConfig:
    """Options of one generation. Those left None are filled from the recipe (``resolved``)."""

    recipe: str | None = None
    classes: str = "coco"
    split: int = 1
    subset: str = "seen"
    source: str = "diffusion"
    model: str | None = None
    revision: str | None = None
    num_samples: int | None = None  # None: DEFAULT_SAMPLES, or every image of a labelled source
    shard_size: int = 100
    seed: int = 0
    out: str | None = None
    objects: str | None = None
    template: str | None = None
    template2: str | None = None
    negative: bool = False
    scheduler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    resolution: int | None = None
    batch_size: int = 4
    layers: str | None = None
    halves: str | None = None
    feature_dtype: str | None = None
    codec: str = DEFAULT_CODEC
    project: int | None = None  # store K channels per resolution group (iosd.projection)
    calibration_samples: int | None = None  # candidates the projection is fitted on
    feature_t: int | None = None
    feature_step: int | None = None
    query_template: str | None = None
    query_pooling: str | None = None
    query_hidden: str | None = None
    gt: str | None = None
    teacher_config: str | None = None
    teacher_checkpoint: str | None = None
    teacher: str | None = None  # --teacher (pipeline/teachers); None: mmdet, kept out of older sets' identity
    teacher_model: str | None = None  # text teachers: comma-separated ids/directories per component
    labels: str | None = None  # image sources: None/"exact" (their masks) or "teacher" (the teacher's, as generated images get)
    min_score: float | None = None
    score_thr: float | None = None
    mask_thr: float | None = None
    stream: str = "train"
    images_per_class: int | None = None
    keep_rejected: bool = False
    daam: bool = False
    device: str = "auto"
    workers: int = 2
    overwrite: bool = False
    quiet: bool = False
    task: str | None = None  # "I/N", "N" or "auto" (iosd.pipeline.tasks; None: one process); never part of the set

    def with_recipe(self) -> tuple[GenConfig, Resolved]:
        """A copy with every option the user left None taken from the recipe, and the record of it."""
        c = GenConfig(**asdict(self))
        if c.recipe is None:
            c.recipe = default_recipe(c.model)
        given = {k: v for k, v in asdict(c).items()}
        resolved = resolve(c.recipe, "gen", given, classes=c.classes)
        for name, value in resolved.values.items():
            setattr(c, name, value)
        # CPU stand-ins: 128 px, and a random-weight teacher that never reaches the papers' scores
        if c.model in CPU_STAND_INS and self.resolution is None:
            c.resolution = WORLD_SIDE if c.model in WORLDS else TINY_RESOLUTION
            resolved.origin["resolution"].update(value=c.resolution, source=f"the {c.model} model's native {c.resolution} px")
        if c.teacher == DEFAULT_TEACHER:
            c.teacher = None  # --teacher mmdet is the default: the same set, identity and bytes as without it
        if c.teacher is not None and c.teacher_labels:
            apply_teacher_defaults(self, c, resolved)
        if self.tiny_teacher or not c.teacher_labels:
            for name in ("min_score", "score_thr"):
                if getattr(self, name) is None:
                    setattr(c, name, 0.0)
                    resolved.origin[name].update(value=0.0, source="exact masks or a random-weight teacher: no confidence to filter on")
        return c, resolved

    def resolved(self) -> GenConfig:
        """Fill defaults (the recipe's, then those that depend on other options) and check every value."""
        c, _ = self.with_recipe()
        for name in ("num_samples", "shard_size", "batch_size", "steps", "workers"):
            if getattr(c, name) is not None and getattr(c, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(c, name)})", "pass a number > 0")
        if c.images_per_class is not None and c.images_per_class <= 0:
            raise UserError(f"--images-per-class must be positive (got {c.images_per_class})", "pass a number > 0")
        if source_kind(c.source) not in SOURCES or (":" in c.source) != (source_kind(c.source) in LABELLED_SOURCES):
            raise UserError(f"unknown --source {c.source!r}", "use diffusion, shapes, coco:ANNOTATIONS.json[:IMAGES_DIR] or folder:DIR")
        if c.labels not in LABELS:
            raise UserError(f"unknown --labels {c.labels!r}", f"use one of {', '.join(x for x in LABELS if x)}")
        if c.labels == "teacher" and source_kind(c.source) not in IMAGE_SOURCES:
            raise UserError(f"--labels teacher is for image sources; --source {c.source} is always labelled by the teacher", "drop --labels, or pass --source shapes (or coco:/folder:)")
        if c.labels == "exact":
            c.labels = None  # the default: the same set, identity and bytes as without it
        labelled = source_kind(c.source) in LABELLED_SOURCES
        if labelled:
            from iosd.pipeline.real_images import check_labelled_options

            check_labelled_options(c.source, negative=c.negative, images_per_class=c.images_per_class)
            c.keep_rejected = True  # every annotated image is a sample, even where a mask vanishes at this resolution
        elif c.num_samples is None:
            c.num_samples = DEFAULT_SAMPLES
        if c.source == "shapes" and c.classes != "shapes":
            raise UserError(f"--source shapes draws the shapes world, not {c.classes!r} classes", "pass --classes shapes")
        if c.stream not in STREAMS:
            raise UserError(f"unknown stream {c.stream!r}", "use train or test")
        if c.steps > 1000:
            raise UserError(f"--steps {c.steps} is beyond the 1000 training timesteps", "pass e.g. 1 (SDXL-Turbo) or 50 (SD v1, DDIM)")
        if not -c.steps <= c.feature_step < c.steps:
            raise UserError(f"--feature-step {c.feature_step} is not one of the {c.steps} denoising calls", f"pass a step in {-c.steps}..{c.steps - 1} (-1 is the last)")
        if c.scheduler not in SCHEDULERS:
            raise UserError(f"unknown --scheduler {c.scheduler!r}", f"use one of {', '.join(SCHEDULERS)}")
        if c.halves not in HALVES:
            raise UserError(f"unknown --halves {c.halves!r}", f"use one of {', '.join(HALVES)}")
        if c.halves == "both" and c.guidance <= 1.0 and c.source == "diffusion":
            raise UserError(f"--halves both needs classifier-free guidance, but --guidance is {c.guidance}", "pass --guidance > 1 (GD: 5) or --halves cond")
        if c.gt not in GT_RULES:
            raise UserError(f"unknown --gt {c.gt!r}", f"use one of {', '.join(GT_RULES)}")
        if c.resolution <= 0 or c.resolution % 32:
            raise UserError(f"--resolution {c.resolution} is not a positive multiple of 32", "use e.g. 512")
        if source_kind(c.source) in IMAGE_SOURCES and c.feature_t is None:
            c.feature_t = IMAGE_SOURCE_T
        if c.feature_t is not None and not 0 <= c.feature_t < 1000:
            raise UserError(f"--feature-t {c.feature_t} is outside 0..999", "pass a timestep in 0..999")
        check_feature_dtype(c.feature_dtype)
        for name in ("min_score", "score_thr", "mask_thr"):
            if not 0 <= getattr(c, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(c, name)} is outside 0..1", "pass a teacher confidence, e.g. 0.8")
        if c.images_per_class is not None:
            c.keep_rejected = True  # evaluation counts filtered images
            c.num_samples = None  # type: ignore[assignment]
        if c.out is None:
            c.out = os.path.join("shards", f"{c.classes}{c.split}" if c.stream == "train" else f"{c.classes}{c.split}-test")
            if labelled:
                from iosd.pipeline.real_images import default_set_name

                c.out = os.path.join("shards", f"{default_set_name(c.source)}-{os.path.basename(c.out)}")
        PromptSpec(c.objects, c.template, c.template2, c.negative).check()
        self.query_spec_of(c)
        resolve_layers(c.layers)
        check_projection_options(c)
        resolve_task(c.task)  # a bad --task or scheduler variable: one line before any work
        c.prechecks()
        return c

    def prechecks(self) -> None:
        """The checks that need no model, before any loads (iosd.prechecks): class names, the
        layer preset of a model known by name, the teacher's files, and --out."""
        check_class_names(load_split(self.classes, self.split).all, f"--classes {self.classes}")
        check_layers_family(self.layers, self.model)
        if self.teacher_labels:
            check_teacher_choice(self.teacher, self.teacher_config, self.teacher_checkpoint, self.teacher_model)
            if self.teacher in (None, DEFAULT_TEACHER) and not self.tiny_teacher:
                check_teacher_files(self.teacher_config, self.teacher_checkpoint)
            elif not self.tiny_teacher:
                check_teacher_models(self.teacher, self.teacher_model)
        check_writable(self.out, "--out" if self.stream == "train" else "--test-shards")

    @staticmethod
    def query_spec_of(c: GenConfig) -> QuerySpec:
        return QuerySpec(c.query_template, c.query_pooling, c.query_hidden).check()

    @property
    def teacher_labels(self) -> bool:
        """Whether the teacher labels the images: always for generated ones; for an image source
        (exact masks) only with --labels teacher."""
        return source_kind(self.source) not in IMAGE_SOURCES or self.labels == "teacher"

    @property
    def tiny_teacher(self) -> bool:
        """A CPU stand-in model with no teacher options: mmdet's own Mask R-CNN, random weights."""
        return self.model in CPU_STAND_INS and self.teacher_config is None and self.teacher_checkpoint is None and self.teacher_model is None

    def identity(self) -> dict:
        raw = ("project", "calibration_samples") if self.project is None else ()  # sets from before --project keep theirs
        raw += unset_teacher_fields(self)  # sets from before --teacher keep theirs
        return {k: v for k, v in asdict(self).items() if k not in NON_IDENTITY and k not in raw}


def load_configured(gen: dict, device: str) -> LoadedModel:
    """The model of a generation config (a manifest's "config"), with its scheduler, checked
    against the config's layer preset; shared by iosd-gen and iosd-predict."""
    loaded = load_model(gen["model"], device=device, revision=gen.get("revision"))
    check_family(gen.get("layers") or "", loaded.family, gen["model"])
    if gen.get("scheduler") == "ddim":
        from diffusers import DDIMScheduler

        loaded.pipe.scheduler = DDIMScheduler.from_config(loaded.pipe.scheduler.config)
    return loaded


def default_prompt(gen: dict, names: list[str]) -> str:
    """The prompt iosd-gen would write for these classes: the one- or two-object template."""
    template = gen.get("template") or "a photograph of a {}"
    if len(names) == 2 and gen.get("template2"):
        return gen["template2"].format(*names)
    return template.format(names[0]) + "".join(f" and a {n}" for n in names[1:])


@dataclass
class Candidate:
    shard: int
    attempt: int
    seed: int
    prompt: str
    names: list[str]
    targets: list[str]  # the names that are supervised (all but IOSD's negative class)
    group: str | None = None  # two-object test prompts: one of PAIR_GROUPS
    image: int | None = None  # labelled sources: the image's index in the source


@dataclass
class StageTimes:
    """Seconds per stage, summed over threads (encode/write run beside diffusion)."""

    seconds: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, dt: float) -> None:
        with self.lock:
            self.seconds[stage] += dt


def plan_pairs(seen: list[str], unseen: list[str], per_class: int, rng: np.random.Generator) -> tuple[list[tuple[str, str]], list[str]]:
    """GD's two-object test prompts: each class ``per_class`` times with a random partner.

    seen+seen pairs every seen class with another seen one, seen+unseen every unseen class
    with a seen one, unseen+unseen every unseen class with another unseen one (a group with
    too few classes is left out). Returns the pairs, in random order within each, and groups.
    """
    pairs: list[tuple[str, str]] = []
    groups: list[str] = []
    for group, anchors, partners in zip(PAIR_GROUPS, (seen, unseen, unseen), (seen, seen, unseen), strict=True):
        if not anchors or len(set(anchors) | set(partners)) < 2:
            continue
        for a in anchors:
            others = [c for c in partners if c != a]
            for _ in range(per_class):
                b = others[rng.integers(len(others))]
                pairs.append((a, b) if rng.random() < 0.5 else (b, a))
                groups.append(group)
    if not pairs:
        raise UserError("two-object test prompts need at least two classes", "use --objects 1 or a split with more classes")
    return pairs, groups


class Plan:
    """Which candidates make up each shard, and how many samples it must hold."""

    def __init__(self, cfg: GenConfig, split: ClassSplit, images=None) -> None:
        self.cfg = cfg
        self.images = images  # a labelled source (iosd.pipeline.real_images): sample i is its image i
        self.classes = split.subset(cfg.subset)
        self.spec = PromptSpec(cfg.objects, cfg.template, cfg.template2, cfg.negative)
        self.groups: list[str] | None = None
        if cfg.images_per_class is not None and cfg.objects == "2":
            # drawn from its own stream: the same plan on every rank and every rerun
            rng = np.random.default_rng([cfg.seed, STREAMS[cfg.stream], PAIRS_TAG])
            seen = [c for c in split.seen if c in self.classes]
            unseen = [c for c in split.unseen if c in self.classes]
            self.fixed, self.groups = plan_pairs(seen, unseen, cfg.images_per_class, rng)
            total = len(self.fixed)
        elif cfg.images_per_class is not None:
            self.fixed = [c for c in self.classes for _ in range(cfg.images_per_class)]
            total = len(self.fixed)
        elif images is not None:
            self.fixed = None
            total = len(images) if cfg.num_samples is None else cfg.num_samples
            if total > len(images):
                raise UserError(f"--num-samples {total} asks for more than the {len(images)} usable images of {cfg.source}", "drop --num-samples to use every image")
        else:
            self.fixed = None
            total = cfg.num_samples
        self.total = total
        self.n_shards = math.ceil(total / cfg.shard_size)

    def target(self, shard: int) -> int:
        return min(self.cfg.shard_size, self.total - shard * self.cfg.shard_size)

    def candidate(self, shard: int, attempt: int) -> Candidate:
        rng = np.random.default_rng([self.cfg.seed, STREAMS[self.cfg.stream], shard, attempt])
        seed = int(rng.integers(2**31 - 1))
        index = shard * self.cfg.shard_size + attempt
        if self.images is not None:
            names = list(self.images.items[index].names)
            prompt = default_prompt({"template": self.spec.template, "template2": self.spec.template2}, names)
            return Candidate(shard, attempt, seed, prompt, names, names, image=index)
        fixed = self.fixed[index] if self.fixed else None
        query, pair = (None, fixed) if isinstance(fixed, tuple) else (fixed, None)
        prompt, names, targets = make_prompt(rng, self.classes, self.spec, query, pair=pair)
        return Candidate(shard, attempt, seed, prompt, names, targets, self.groups[index] if self.groups else None)

    def max_attempts(self, shard: int) -> int:
        return self.target(shard) if self.fixed or self.images is not None else 50 * self.target(shard) + 100


def dist_env() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _on_rank0(world: int, rank: int, action) -> None:
    """Run ``action`` on rank 0; every rank raises its UserError (no rank waits forever)."""
    error = None
    if rank == 0:
        try:
            action()
        except UserError as err:
            error = (err.problem, err.fix)
    if world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise UserError(*error)


class Generator:
    """Runs one configured generation into one shard directory (this rank's share of it)."""

    def __init__(self, cfg: GenConfig) -> None:
        filled, self.recipe = cfg.with_recipe()
        self.cfg = filled.resolved()
        if cfg.recipe is None and cfg.model in CPU_STAND_INS and not cfg.quiet and dist_env()[0] == 0:
            _note(stand_in_note(cfg.model, self.cfg.recipe))
        self.split = load_split(self.cfg.classes, self.cfg.split)
        self._manifest_lock = threading.Lock()  # shard writers rebuild dataset.json one at a time
        self.images = None  # a labelled source, checked whole before anything is written
        if source_kind(self.cfg.source) in LABELLED_SOURCES:
            from iosd.pipeline.real_images import open_labelled

            show = not cfg.quiet and dist_env()[0] == 0
            self.images = open_labelled(self.cfg.source, self.split, self.cfg.subset, progress=show)
            for note in self.images.notes() if show else []:
                _note(note)
        self.plan = Plan(self.cfg, self.split, self.images)
        self.times = StageTimes()
        self.rank, self.world = dist_env()
        self.task = resolve_task(self.cfg.task)  # independent tasks: no process group between them

    def _teacher(self):
        if not self.cfg.teacher_labels:
            return None
        from iosd.pipeline.teachers import build_teacher, options_from_config

        return build_teacher(options_from_config(asdict(self.cfg), str(self.loaded.device), tiny=self.cfg.tiny_teacher))

    def _probe_shapes(self) -> dict[str, list[int]]:
        """Run the UNet once on zeros to learn each captured layer's (C, H, W)."""
        side = self.cfg.resolution // self.loaded.pipe.vae_scale_factor
        lat = torch.zeros(1, self.loaded.pipe.unet.config.in_channels, side, side, device=self.loaded.device, dtype=self.loaded.dtype)
        feats = renoised_pass(self.loaded, self.capture, lat, [""], [0], 999, self.cfg.resolution)
        return {p: list(t.shape[1:]) for p, t in feats.items()}

    def header(self, shapes: dict[str, list[int]]) -> dict:
        dtype_bytes = {"float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}[self.cfg.feature_dtype]
        shapes = stored_shapes(self.cfg, shapes)  # --project: one K-channel array per group
        raw = sum(math.prod(s) * dtype_bytes for s in shapes.values())
        teacher = self.teacher.describe() if self.teacher is not None else self.images.describe() if self.images is not None else {"kind": "exact", "source": self.cfg.source}
        meaningful = not teacher.get("random_weights", False)
        notes = [] if meaningful else ["teacher has random weights (--model tiny without teacher options): its masks are meaningless; this set only exercises the machinery"]
        return {
            "kind": "iosd-shards",
            "recipe": self.recipe.record(),
            "identity": {**self.cfg.identity(), **({"source_fingerprint": self.images.fingerprint} if self.images is not None else {})},
            "config": {k: v for k, v in asdict(self.cfg).items() if k not in ("quiet", "overwrite", "task", *unset_teacher_fields(self.cfg))},
            "classes": self.split.to_json(),
            "subset": self.cfg.subset,
            "image_size": [self.cfg.resolution, self.cfg.resolution],
            "model": self.loaded.info,
            "features": {
                "layers": [{"path": p, "key": layer_key(p), "shape": s} for p, s in shapes.items()],
                "preset": self.cfg.layers,
                "dtype": self.cfg.feature_dtype,
                "codec": self.cfg.codec,
                "halves": self.cfg.halves,
                "capture": {"mode": "renoised", "t": self.cfg.feature_t} if self.cfg.feature_t is not None else {"mode": "denoising-step", "step": self.cfg.feature_step},
                "raw_bytes_per_sample": raw,
            },
            "embedding": self.embedding_spec,
            "teacher": teacher,
            "masks_meaningful": meaningful,
            "notes": notes,
        }

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        if self.cfg.device in ("auto", "cpu") and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
            # leave cores to the encode threads: oversubscribed OpenMP spins slow diffusion ~5x
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - self.cfg.workers))
        t0 = time.perf_counter()
        self.loaded: LoadedModel = load_configured(asdict(self.cfg), self.cfg.device)
        self.times.add("load", time.perf_counter() - t0)
        if self.loaded.dtype == torch.float32 and self.cfg.model not in CPU_STAND_INS and not self.cfg.quiet and self.rank == 0:
            _note(f"{self.cfg.model} runs in float32 on {self.loaded.device} (float16 UNet and text encoders need CUDA; the VAE stays float32 everywhere)")
        self.teacher = self._teacher()
        if self.teacher is not None:
            self.teacher.check_classes(list(self.split.subset(self.cfg.subset)))
        self.capture = FeatureCapture(self.loaded.pipe.unet, resolve_layers(self.cfg.layers), halves=self.cfg.halves).__enter__()
        query = GenConfig.query_spec_of(self.cfg)
        self.embedding_spec = embedding_spec(self.loaded.pipe, query)
        names = list(self.split.all)
        self.embeddings = dict(zip(names, class_embeddings(self.loaded.pipe, names, query), strict=True))
        if query.pooling == "first" and self.rank == 0:
            for group in coinciding_queries(self.loaded.pipe.tokenizer, names):
                _warn(f"classes {', '.join(map(repr, group))} share their first token: first-token queries cannot tell them apart (the recipe still runs as published)")
        self.subsets = {**{n: "seen" for n in self.split.seen}, **{n: "unseen" for n in self.split.unseen}}
        self.writer = ShardSetWriter(self.cfg.out, self.header(self._probe_shapes()), self.plan.n_shards, overwrite=self.cfg.overwrite)
        _on_rank0(self.world, self.rank, lambda: open_output(self))
        self.daam = None
        if self.cfg.daam:
            from iosd.pipeline.daam import DaamRecorder

            side = self.cfg.resolution // self.loaded.pipe.vae_scale_factor
            self.daam = DaamRecorder(self.loaded.pipe.unet, (side, side)).__enter__()
        self.projection = prepare_projection(self)  # --project: fitted (or reused) before any shard

    def close(self) -> None:
        self.capture.__exit__(None, None, None)
        if self.daam is not None:
            self.daam.__exit__(None, None, None)

    # -- one batch -------------------------------------------------------------------------
    def _produce(self, batch: list[Candidate]) -> Produced:
        prompts, seeds = [c.prompt for c in batch], [c.seed for c in batch]
        if self.daam is not None:
            self.daam.reset()
        t0 = time.perf_counter()
        if self.images is not None:
            out = labelled_world(self.loaded, self.capture, self.images, [c.image for c in batch], prompts, seeds, size=self.cfg.resolution, feature_t=self.cfg.feature_t)
        elif self.cfg.source == "shapes":
            out = shapes_world(self.loaded, self.capture, prompts, [c.names for c in batch], seeds, size=self.cfg.resolution, feature_t=self.cfg.feature_t)
        else:
            out = diffuse(self.loaded, self.capture, prompts, seeds, steps=self.cfg.steps, size=self.cfg.resolution, guidance=self.cfg.guidance, feature_step=self.cfg.feature_step, feature_t=self.cfg.feature_t, daam=self.daam)
        if self.loaded.device.type == "cuda":
            torch.cuda.synchronize(self.loaded.device)
        self.times.add("diffusion", time.perf_counter() - t0)
        t0 = time.perf_counter()
        # Features leave the device in their stored dtype (quantised there by the rule
        # encode_features runs on the CPU, so the shards are byte-identical): half of float32's
        # bytes over PCIe and in host memory for float16, a quarter for int8 and fp8. Only a
        # projection needs them raw on the host (float32).
        if self.cfg.project:
            out.features = {p: t.to("cpu", torch.float32) for p, t in out.features.items()}
        else:
            out.store(self.cfg.feature_dtype)
        self.times.add("capture", time.perf_counter() - t0)
        return out

    def _labels(self, batch: list[Candidate], out: Produced) -> list[tuple[list[np.ndarray], list[float]]]:
        if self.teacher is None:
            return [(list(m), [1.0] * len(m)) for m in out.exact_masks]
        t0 = time.perf_counter()
        labels = self.teacher.label(list(out.images), [c.names for c in batch])
        self.times.add("teacher", time.perf_counter() - t0)
        return [([lab.mask for lab in per], [lab.score for lab in per]) for per in labels]

    def _daam(self, batch: list[Candidate]) -> list[np.ndarray] | None:
        if self.daam is None:
            return None
        spans = [[find_token_span(self.loaded.pipe.tokenizer, c.prompt, n) for n in c.names] for c in batch]
        return self.daam.heat_maps(spans, self.cfg.resolution // self.loaded.pipe.vae_scale_factor)

    def _encode(self, cand: Candidate, image: np.ndarray, feats: dict[str, np.ndarray], records, masks, heat) -> dict:
        t0 = time.perf_counter()
        if self.projection is not None:
            feats = self.projection.apply_numpy(feats)
        feat_bytes = encode_features(feats, self.cfg.feature_dtype, self.cfg.codec)
        sample = Sample(
            key=sample_key(cand.shard, cand.attempt),
            image=image,
            prompt=cand.prompt,
            seed=cand.seed,
            classes=records,
            masks=masks,
            embeddings=np.stack([self.embeddings[n] for n in cand.names]),
            daam=heat,
            extra={"shard": cand.shard, "attempt": cand.attempt, "source": self.cfg.source, **({"group": cand.group} if cand.group else {}),
                   **(self.images.items[cand.image].origin if cand.image is not None else {})},
        )
        members = encode_sample(sample, feat_bytes)
        self.times.add("encode", time.perf_counter() - t0)
        return members

    # -- one shard -------------------------------------------------------------------------
    def _produce_shard(self, shard: int, pool: ThreadPoolExecutor, progress) -> tuple[list[Future], dict]:
        target, limit = self.plan.target(shard), self.plan.max_attempts(shard)
        futures: list[Future] = []
        per_class: dict[str, Counter] = defaultdict(Counter)
        stats = Counter()
        attempt = 0
        while len(futures) < target:
            if attempt >= limit:
                raise UserError(f"shard {shard}: only {len(futures)} of {target} samples passed the filter in {limit} candidates", "lower --min-score or check the teacher")
            size = min(self.cfg.batch_size, limit - attempt)
            batch = [self.plan.candidate(shard, attempt + k) for k in range(size)]
            attempt += size
            out = self._produce(batch)
            labels = self._labels(batch, out)
            heats = self._daam(batch)
            for b, (cand, (masks, scores)) in enumerate(zip(batch, labels, strict=True)):
                if len(futures) >= target:
                    break  # later candidates are never used: same shard whatever the batch size
                records, kept = judge(cand.names, masks, scores, self.subsets, self.cfg.min_score, cand.targets)
                stats["candidates"] += 1
                for r in records:
                    per_class[r.name][r.decision] += 1
                if not any(r.decision == KEPT for r in records) and not self.cfg.keep_rejected:
                    stats["dropped_samples"] += 1
                    continue
                feats = out.sample_features(b, None if self.cfg.project else self.cfg.feature_dtype)
                heat = heats[b] if heats is not None else None
                futures.append(pool.submit(self._encode, cand, out.images[b], feats, records, kept, heat))
                if progress is not None:
                    progress()
        stats["written"] = len(futures)
        return futures, {**stats, "per_class": {k: dict(v) for k, v in per_class.items()}}

    def _write(self, shard: int, futures: list[Future], stats: dict) -> dict:
        """Stream one shard's samples into its tar as their encodes finish (in order): a
        written sample leaves memory at once, so no shard is ever held whole."""
        t0, waited = time.perf_counter(), 0.0
        stats["feature_bytes"] = 0

        def members():
            nonlocal waited
            while futures:
                w0 = time.perf_counter()
                member = futures.pop(0).result()
                waited += time.perf_counter() - w0
                stats["feature_bytes"] += len(member["feat.zarr.zip"])
                yield member

        record = self.writer.write_shard(shard, members(), stats)
        if self.rank == 0 and self.task.count == 1:  # tasks: dataset.json only once complete
            with self._manifest_lock:
                self.writer.write_manifest()
        self.times.add("write", time.perf_counter() - t0 - waited)
        return record

    def run(self) -> dict:
        """Generate this rank's missing shards; returns the final manifest (rank 0) or {}."""
        threads = torch.get_num_threads()  # setup() may lower it for the encode threads
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)  # a caller's later work (e.g. training) gets every core back

    def _run(self) -> dict:
        t0 = time.perf_counter()
        self.setup()
        self.times.add("setup", time.perf_counter() - t0 - self.times.seconds["load"])
        try:
            done = self.writer.done()
            owned = [i for i in range(self.plan.n_shards) if self.task.owns(i, self.rank, self.world)]
            mine = [i for i in owned if i not in done]
            if self.rank == 0:
                task_note(self.task, "shards", len(owned), self.plan.n_shards)
            todo = sum(self.plan.target(i) for i in mine)
            writers = shard_writers(self.cfg.workers)
            with stage_progress(self.rank == 0 and not self.cfg.quiet, todo, f"{self.cfg.out}", "gen") as advance, ThreadPoolExecutor(self.cfg.workers) as pool, ThreadPoolExecutor(writers) as writer:
                pending: list[Future] = []
                for shard in mine:
                    futures, stats = self._produce_shard(shard, pool, advance)
                    pending.append(writer.submit(self._write, shard, futures, stats))
                    while len(pending) > writers + 1:  # bound memory: one shard more than writers in flight
                        pending.pop(0).result()
                for p in pending:
                    p.result()
        finally:
            self.close()
        _barrier(self.world)
        manifest = self._finish() if self.rank == 0 else {}
        _barrier(self.world)
        return manifest

    def _finish(self) -> dict:
        """The final dataset.json (one task), or, for one of several independent tasks, the set
        assembled when this task finds it complete; otherwise the manifest as it stands,
        unwritten (the last task to finish, or ``iosd-shards merge``, writes it)."""
        recs = self.writer.records()  # one listing of the set decides, and builds, what follows
        missing = self.writer.missing(recs)
        if self.task.count == 1 or not missing:
            return self.writer.write_manifest(recs)
        if not self.cfg.quiet:
            _note(f"task {self.task.label()} is done; {len(missing)} of {self.plan.n_shards} shards are still missing: the last task to finish writes dataset.json (or run: iosd-shards merge {self.cfg.out})")
        return self.writer.build_manifest(recs)


def shard_writers(workers: int) -> int:
    """Threads writing shards, each its own tar, beside ``workers`` encode threads. Writing a
    sample (sha256 and the kernel's copy into the page cache) costs 0.8 of encoding it at the
    real sizes (gd: 128 vs 159 ms of one core per 64 MB sample, ``bench/gen.py
    --encode-only``), so one writer per encoder; a writer waiting on encodes holds no core."""
    return max(1, workers)


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr)


def _note(message: str) -> None:
    import sys

    print(f"note: {message}", file=sys.stderr)


def stand_in_note(model: str, recipe: str) -> str:
    return f"--model {model} is a CPU stand-in: recipe {recipe!r} by default (the published schedules take GPU hours); pass --recipe to choose another"


def generate(cfg: GenConfig) -> tuple[dict, StageTimes]:
    gen = Generator(cfg)
    manifest = gen.run()
    return manifest, gen.times
