"""The training loop: shards -> grounding head, with DDP, AMP, checkpoints, resume and validation.

One process per GPU (or CPU) under torchrun, each reading its own share of the shards
(``iosd.train.data``); ranks run the same number of steps. The loss is BCE on the mask
logits (plus an optional dice term) over the classes the teacher kept; a class it filtered
out is not queried at all, so it contributes nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from iosd import __version__
from iosd.choices import LOSS_SIZES, SCHEDULES, SUBSETS
from iosd.errors import UserError, storage_error
from iosd.manifest import layout_mismatch
from iosd.projection import for_shard_set as projection_for
from iosd.recipes import FAST_RECIPE, Resolved, check_recipe_layout, get_recipe, recipe_of, resolve
from iosd.train import checkpoint as ckpt
from iosd.train.data import (
    ON_CORRUPT,
    SKIP_HINT,
    DamagedShard,
    DecodeSpec,
    TrainLoader,
    TrainStream,
    ValStream,
    start_positions,
    val_batches,
)
from iosd.train.distributed import DistEnv, setup
from iosd.train.runlog import CURVE_NAME, METRICS_NAME, MetricsLog, Progress, plot_curve
from iosd.train.shards import ShardSet, resolve_shards
from iosd.train.validate import ValTally, run_validation

# What a run directory may hold; anything else makes it foreign.
RUN_FILES = {ckpt.CHECKPOINT_NAME, ckpt.STEPS_DIR, METRICS_NAME, CURVE_NAME, "tensorboard"}


def _foreign_files(run_dir: Path) -> set[str]:
    """Names in a run directory that iosd-train did not write (its own temp leftovers excluded)."""
    return {p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not (p.name.startswith(".") and ".tmp" in p.name)}


# Fixed by the checkpoint: a resumed run may not change them.
ARCHITECTURE = ("head", "head_options", "recipe")
RECIPE_OPTIONS = tuple(get_recipe(FAST_RECIPE).settings["train"])


@dataclass
class TrainConfig:
    """Options of one training run. Those left None come from the recipe (the shards' own
    unless ``recipe`` names another), filled in once the shard set is known."""

    shards: str
    recipe: str | None = None
    head: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int = 0
    schedule: str | None = None
    decay_every: int | None = None
    decay_factor: float | None = None
    loss_size: str | None = None
    dice: float | None = None
    min_score: float = 0.0
    subset: str = "seen"
    val: str | None = None
    val_every: int = 200
    save_every: int = 200
    log_every: int = 10
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    init: str | None = None
    head_options: dict = field(default_factory=dict)
    workers: int | None = None
    device: str = "auto"
    amp: bool | None = None
    compile: bool = False
    on_corrupt: str = "warn"
    seed: int = 0
    keep: int = 1
    tensorboard: bool = True
    quiet: bool = False

    def check(self) -> TrainConfig:
        for name in ("steps", "batch_size", "val_every", "save_every", "log_every", "decay_every", "keep"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})", "pass a number > 0")
        for name in ("warmup",):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0 (got {self.workers})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number (got {self.lr})")
        if self.weight_decay < 0 or self.dice < 0:
            raise UserError("--weight-decay and --dice must be >= 0")
        if not 0 <= self.min_score <= 1:
            raise UserError(f"--min-score {self.min_score} is outside 0..1", "pass a teacher confidence, e.g. 0.8")
        if not self.decay_factor > 0:
            raise UserError(f"--decay-factor must be > 0 (got {self.decay_factor})", "pass e.g. 0.5")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        if self.loss_size not in LOSS_SIZES:
            raise UserError(f"unknown --loss-size {self.loss_size!r}", f"use one of {', '.join(LOSS_SIZES)}")
        if self.subset not in SUBSETS:
            raise UserError(f"unknown --subset {self.subset!r}", f"use one of {', '.join(SUBSETS)}")
        if self.on_corrupt not in ON_CORRUPT:
            raise UserError(f"unknown --on-corrupt {self.on_corrupt!r}", f"use one of {', '.join(ON_CORRUPT)}")
        return self

    def saved(self) -> dict:
        """The options recorded in checkpoints (where the run lives is not one of them)."""
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "overwrite", "quiet", "out")}


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of --lr for the step about to run (0-based): linear warm-up, then the schedule."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    if cfg.schedule == "step":
        return warm * cfg.decay_factor ** (step // cfg.decay_every)
    return warm


def default_out(shard_set: ShardSet, head: str) -> str:
    return os.path.join("runs", f"{shard_set.name}-{head}")


def default_workers(env: DistEnv) -> int:
    """Decoding workers per rank: the CPUs this rank may use, one kept for the training loop."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(4, cpus // max(env.local_world, 1) - 1))


def _mask_loss():
    from iosd.train.losses import mask_loss

    return mask_loss


class Trainer:
    def __init__(self, cfg: TrainConfig, explicit: frozenset[str] | None = None) -> None:
        self.cfg = cfg
        # options given by the user; from Python, every option that is not None
        self.explicit = explicit if explicit is not None else frozenset(k for k, v in asdict(cfg).items() if v is not None and k in RECIPE_OPTIONS)
        self.env = setup(cfg.device)
        self.notes: list[str] = []
        self.progress: Progress | None = None
        self.stop_requested = False

    # -- messages --------------------------------------------------------------------------
    def note(self, message: str) -> None:
        text = f"warning: {message}" if self.env.world == 1 else f"warning [rank {self.env.rank}]: {message}"
        self.notes.append(message)
        if self.progress is not None:
            self.progress.print(text)
        elif not self.cfg.quiet or "corrupt" in message:
            import sys

            print(text, file=sys.stderr)

    # -- setup -----------------------------------------------------------------------------
    def _prepare(self) -> None:
        self.shards = resolve_shards(self.cfg.shards)
        self.resumed: dict | None = None
        self.start_over = False
        filled, resolved = self._with_recipe(self.cfg)
        self.run_dir = Path(self.cfg.out or default_out(self.shards, filled.head))
        if self.cfg.resume:
            self.resumed, self.resume_weights = self._check_resume()
            # the run's own options; a run saved before recipes gets the rest from its shards' recipe
            filled, _ = self._with_recipe(self._merge_resumed(self.resumed))
            self.recipe = self.resumed.get("recipe") or {"name": filled.recipe}
        else:
            self.recipe = {"name": resolved.recipe, "train": resolved.record(), "shards": (self.shards.manifest or {}).get("recipe")}
            self._check_fresh_dir()
        cfg = self.cfg = filled.check()
        for message in self.shards.notes:
            self.note(message)
        self.projection = projection_for(self.shards)  # projected shards: the basis they were stored with
        self.val_shards = None
        if cfg.val:
            self.val_shards = resolve_shards(cfg.val)
            diff = layout_mismatch(self.shards.layout, self.val_shards.layout)
            if diff and self.projection is not None and not layout_mismatch(self.projection.raw_layout(self.shards.layout["embedding_dim"]), self.val_shards.layout):
                diff = None  # raw held-out shards: validation projects them with the training basis
            if diff:
                raise UserError(f"--val {cfg.val} does not match the training shards' feature layout: {diff}", "validate on shards generated with the same model and --layers")
        if self.env.main:
            self._check_writable()  # before the run directory is cleared and before any step
            if self.start_over:
                self._clear_run_dir()
        self.env.barrier()

    def _with_recipe(self, cfg: TrainConfig) -> tuple[TrainConfig, Resolved]:
        """Options left None filled from the recipe: the one named, else the shards' own."""
        manifest = self.shards.manifest or {}
        own = recipe_of(manifest)
        name = cfg.recipe or own
        if name is None:
            name = FAST_RECIPE  # shard sets written before recipes were made this way
            message = f"{cfg.shards} records no recipe (written before recipes): training with recipe {name!r}"
            if message not in self.notes:
                self.note(message)
        check_recipe_layout(name, own, [p for p, _ in self.shards.layout["layers"]], cfg.shards)
        classes = (manifest.get("classes") or {}).get("name")
        resolved = resolve(name, "train", asdict(cfg), classes=classes)
        values = {**asdict(cfg), **resolved.values, "recipe": name}
        return TrainConfig(**values), resolved

    def show_config(self) -> None:
        """Print the resolved settings of this run (recipe and user), then nothing else."""
        from iosd.recipes import show_config

        self.shards = resolve_shards(self.cfg.shards)
        filled, resolved = self._with_recipe(self.cfg)
        filled.check()
        show_config(resolved)

    def _check_fresh_dir(self) -> None:
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise UserError(f"--out {d} is a file", "choose a directory")
        if not d.exists():
            return
        if _foreign_files(d):
            hint = "; --overwrite only replaces a run" if self.cfg.overwrite else ""
            raise UserError(f"--out {d} holds files that are not an iosd-train run", f"choose a new or empty directory{hint}")
        if (d / ckpt.CHECKPOINT_NAME).exists() and not self.cfg.overwrite:
            raise UserError(f"{d} already holds a training run", "pass --resume to continue it, --overwrite to start over, or another --out")
        # a run cut off before its first checkpoint (or --overwrite): start it over, cleanly
        self.start_over = True

    def _check_writable(self) -> None:
        """Create --out and prove it takes a file (the writer's probe, iosd.store): an unwritable
        run directory (permissions, a read-only mount) stops here in one line, not at the first
        log line or checkpoint after minutes of training."""
        from iosd.store import LocalStore

        try:
            LocalStore(self.run_dir).make("")
        except UserError as err:
            fix = "make it writable, then rerun with --resume" if self.cfg.resume else "make it writable or pass another --out, then rerun"
            raise UserError(err.problem, fix) from None

    def _clear_run_dir(self) -> None:
        for path in self.run_dir.iterdir():  # only run files and temp leftovers (checked above)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _check_resume(self) -> tuple[dict, Path]:
        d = self.run_dir
        if not (d / ckpt.CHECKPOINT_NAME).exists():
            raise UserError(f"--resume: {d} holds no iosd-train checkpoint", "start without --resume, or point --out at the run to continue")
        info, weights = ckpt.read_checkpoint(d)
        if not all(key in info for key in ("train", "head", "shards", "layout")):
            raise UserError(f"--resume: {d} was not written by iosd-train", "point --out at a training run directory")
        if info["shards"]["identity"] != self.shards.identity:
            raise UserError(f"--resume: {d} was trained on another shard set ({info['shards']['spec']}, not {self.cfg.shards})", "pass the run's own shards, or start a new run with another --out")
        diff = layout_mismatch(info["layout"], self.shards.layout)
        if diff:
            raise UserError(f"--resume: the checkpoint's feature layout differs from the shards': {diff}", "train a new head for these shards")
        return info, weights

    def _merge_resumed(self, info: dict) -> TrainConfig:
        """The run's saved options, overridden by those given again on the command line."""
        saved = dict(info["train"]["args"])
        given = asdict(self.cfg)
        for name in ARCHITECTURE:
            if name in self.explicit and given[name] != saved.get(name):
                raise UserError(f"--resume: the run trains a {saved.get('head')} head with options {saved.get('head_options')}; --{name.replace('_', '-')} cannot change", "drop the option, or start a new run with another --out")
        known = {f.name for f in fields(TrainConfig)}
        merged = {k: v for k, v in saved.items() if k in known}
        merged.update({k: given[k] for k in self.explicit if k in known})
        merged.update(resume=True, overwrite=False, shards=self.cfg.shards, out=str(self.run_dir), quiet=self.cfg.quiet)
        changed = sorted(k for k in self.explicit if k in saved and saved[k] != given[k] and k not in ("shards",))
        if changed:
            self.note(f"resuming with changed option(s): {', '.join(changed)}")
        return TrainConfig(**merged).check()

    def _build(self) -> None:
        from iosd.train.heads import build_head

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        if self.resumed:
            self.head = ckpt.build_saved_head(self.resumed, self.run_dir / ckpt.CHECKPOINT_NAME)
            ckpt.load_weights(self.head, self.resume_weights)
        else:
            self.head = build_head(cfg.head, self.shards.layout, **self._head_options())
            if cfg.init:
                info, weights = ckpt.read_checkpoint(cfg.init)
                diff = layout_mismatch(info["layout"], self.shards.layout)
                if diff:
                    raise UserError(f"--init {cfg.init} was trained on another feature layout: {diff}", "start from a head trained on shards like these")
                if info["head"] != self.head.config:
                    raise UserError(f"--init {cfg.init} is a {info['head'].get('kind')} head with other options", "pass the same --head and --head-option values")
                ckpt.load_weights(self.head, weights)
        self.head.to(self.env.device).train()
        self.mask_size = int(self.head.config["mask_size"])
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        cuda = self.env.device.type == "cuda"
        self.amp = cfg.amp if cfg.amp is not None else cuda
        if self.amp and not cuda:
            raise UserError("--amp needs a CUDA device", "drop --amp on CPU")
        self.amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.step = 0
        if self.resumed:
            ckpt.load_training_state(self.resume_weights, self.optimizer, self.scaler)
            self.step = int(self.resumed["step"])
        model: torch.nn.Module = self.head
        if self.env.active:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.env.device.index] if cuda else None)
        if cfg.compile:
            model = torch.compile(model)
        self.model = model
        self.loss_fn = _mask_loss()

    def _head_options(self) -> dict:
        """--head-option values, plus the mask size the loss is computed at (the recipe's)."""
        options = dict(self.cfg.head_options)
        image = (self.shards.manifest or {}).get("image_size")
        if self.cfg.loss_size == "image" and image and "mask_size" not in options:
            options["mask_size"] = int(image[0])
        return options

    def autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _loader(self) -> TrainLoader:
        cfg = self.cfg
        workers = cfg.workers if cfg.workers is not None else default_workers(self.env)
        self.workers = workers
        spec = DecodeSpec.for_shards(self.shards, min_score=cfg.min_score, subsets=("seen",) if cfg.subset == "seen" else None, mask_size=self.mask_size)
        saved = self.resumed["train"]["data_position"] if self.resumed else None
        starts, rotate, why = start_positions(saved, identity=self.shards.identity, rank=self.env.rank, world=self.env.world, workers=workers)
        if why and self.env.main:
            self.note(why)
        stream = TrainStream(self.shards, spec, cfg.batch_size, seed=cfg.seed, on_corrupt=cfg.on_corrupt, rank=self.env.rank, world=self.env.world, start=starts, rotate=rotate)
        return TrainLoader(stream, workers, pin_memory=self.env.device.type == "cuda")

    # -- one step --------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        from iosd.train.data import to_device_features  # features travel in their stored dtype

        dev = self.env.device
        return {
            "features": to_device_features(batch, dev),  # dequantised to float32 on the device
            "queries": batch["queries"].to(dev, non_blocking=True),
            "query_mask": batch["query_mask"].to(dev, non_blocking=True),
            "targets": batch["targets"].to(dev, non_blocking=True).float(),  # 0/1 masks come as uint8
        }

    def train_step(self, batch: dict) -> torch.Tensor:
        """One optimizer step on a device batch; returns the (detached) loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
        with self.autocast():
            logits = self.model(batch["features"], batch["queries"], batch["query_mask"])
        loss = self.loss_fn(logits.float(), batch["targets"], batch["query_mask"], dice_weight=self.cfg.dice)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    # -- validation and checkpoints --------------------------------------------------------
    def validate(self) -> dict:
        cfg = self.cfg
        spec = DecodeSpec.from_layout(self.val_shards.layout, min_score=cfg.min_score, subsets=None, full_masks=True)
        stream = ValStream(self.val_shards, spec, cfg.batch_size, cfg.on_corrupt, self.env.rank, self.env.world)
        batches = val_batches(stream, self.workers, self.note)
        if self.projection is not None and "projection" not in self.val_shards.layout:
            batches = ({**b, "features": self.projection.apply(b["features"])} for b in batches)
        acc = run_validation(self.model, batches, self.env.device, self.autocast)
        total = ValTally()
        for part in self.env.gather(acc):
            total.merge(part)
        if total.empty:
            raise UserError(f"--val {cfg.val} holds no sample with a kept mask", "pass held-out shards written by iosd-gen (or lower --min-score)")
        return total.summary()

    def checkpoint_info(self, loader: TrainLoader, last: dict) -> dict:
        cfg = self.cfg
        ranks = self.env.gather((loader.positions, loader.next_worker))
        slots = [tuple(p) for positions, _ in ranks for p in positions]
        next_worker = [worker for _, worker in ranks]
        manifest = self.shards.manifest or {}
        samples = self.step * cfg.batch_size * self.env.world
        return {
            "step": self.step,
            "recipe": self.recipe,
            "head": self.head.config,
            "layout": self.shards.layout,
            "embedding": manifest.get("embedding"),
            "classes": manifest.get("classes"),
            "subset": manifest.get("subset"),
            "image_size": manifest.get("image_size"),
            "features": {k: v for k, v in manifest.get("features", {}).items() if k != "layers"} or None,
            "generation": manifest.get("config"),
            "model": manifest.get("model"),
            "shards": self.shards.describe(),
            "val_shards": self.val_shards.describe() if self.val_shards else None,
            "train": {
                "args": cfg.saved(),
                "world": self.env.world,
                "workers": self.workers,
                "samples": samples,
                "epochs": round(samples / self.shards.samples, 3) if self.shards.samples else None,
                "data_position": {"identity": self.shards.identity, "slots_count": len(slots), "slots": slots, "next_worker": next_worker, "seed": cfg.seed},
                "metrics": last,
            },
            "iosd_version": __version__,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }

    def save(self, loader: TrainLoader, last: dict) -> None:
        info = self.checkpoint_info(loader, last)  # collective: every rank takes part
        if self.env.main:
            ckpt.save_checkpoint(self.run_dir, self.head, info, optimizer=self.optimizer, scaler=self.scaler, keep=self.cfg.keep, projection=self.projection)
        self.env.barrier()

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        self._prepare()
        self._build()
        cfg, env = self.cfg, self.env
        log = MetricsLog(self.run_dir, enabled=env.main, tensorboard=cfg.tensorboard)
        if self.resumed and env.main:
            log.truncate_after(self.step)
        loader = self._loader()
        self.progress = Progress(env.main and not cfg.quiet, cfg.steps, self.step, str(self.run_dir))
        previous_handler = self._catch_interrupt()
        started = time.perf_counter()
        first_step = self.step
        last: dict = {}
        loss_sum = torch.zeros((), device=env.device, dtype=torch.float64)
        count = samples = 0
        tick = time.perf_counter()
        try:
            while self.step < cfg.steps:
                batch = self._to_device(self._next_batch(loader))
                loader.copied()
                loss = self.train_step(batch)
                self.step += 1
                loss_sum += loss.double()
                count += 1
                samples += batch["queries"].shape[0]
                step = self.step
                save_now = step % cfg.save_every == 0 or step == cfg.steps
                val_now = self.val_shards is not None and (step % cfg.val_every == 0 or step == cfg.steps)
                stop = self._stop_agreed()
                if step % cfg.log_every == 0 or save_now or val_now or stop:
                    total_loss, total_count, total_samples = env.sum([loss_sum.item(), count, samples])
                    mean = total_loss / max(total_count, 1)
                    if not math.isfinite(mean):
                        raise UserError(f"the loss became {mean} at step {step}", "lower --lr, check the shards for extreme feature values, or --resume from the last checkpoint with a smaller --lr")
                    elapsed = time.perf_counter() - tick
                    last = {"step": step, "loss": mean, "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": total_samples / elapsed if elapsed > 0 else None, "elapsed_s": round(time.perf_counter() - started, 3)}
                    log.write(last)
                    self.progress.advance(step, loss=f"{mean:.4f}", speed=f"{last['samples_per_s']:.1f}")
                    loss_sum.zero_()
                    count = samples = 0
                    tick = time.perf_counter()
                else:
                    self.progress.advance(step)
                if val_now:
                    metrics = self.validate()
                    last = {**last, **metrics}
                    log.write({"step": step, **metrics})
                    self.progress.advance(step, val=f"val mIoU {metrics['val_miou']:.3f}")
                    if env.main:
                        plot_curve(self.run_dir)
                if save_now or stop:
                    self.save(loader, last)
                    tick = time.perf_counter()
                if stop:
                    break
        except RuntimeError as err:
            if "DataLoader worker" not in str(err):
                raise
            raise self._worker_died(err) from None
        except Exception as err:  # a full disk or an unwritable file mid-run: --resume only once a checkpoint is saved
            line = storage_error(err, self._then())
            if line is None:
                raise
            raise line from None
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.progress.close()
            loader.close()
            log.close()
        if env.main:
            plot_curve(self.run_dir)
        seconds = time.perf_counter() - started
        summary = {
            "run": str(self.run_dir),
            "recipe": self.cfg.recipe,
            "step": self.step,
            "interrupted": self.step < cfg.steps,
            "loss": last.get("loss"),
            "val_miou": last.get("val_miou"),
            "val_seen_miou": last.get("val_seen_miou"),
            "val_unseen_miou": last.get("val_unseen_miou"),
            "seconds": round(seconds, 2),
            "samples_per_s": round((self.step - first_step) * cfg.batch_size * env.world / seconds, 2) if seconds > 0 else None,
            "warnings": len(self.notes),
        }
        if env.active:
            summary["steps_per_rank"] = env.gather(self.step)
        env.barrier()
        env.close()
        return summary

    def _next_batch(self, loader: TrainLoader) -> dict:
        """The loader's next batch; a shard that cannot be read (removed or truncated since the
        run began) ends the run in one line: the shard, how to repair the set, how to go on."""
        try:
            return loader.next(self.note)
        except DamagedShard as err:
            raise UserError(err.problem, f"{err.fix}, {self._then()}; {SKIP_HINT}") from None

    def _worker_died(self, err: RuntimeError) -> UserError:
        """A loader worker killed by a signal (SIGBUS when a tar it had mapped was truncated
        under it), said in one line; torch raises it wherever the main process then is."""
        where = self.cfg.shards
        return UserError(f"a data-loading worker died reading {where} ({str(err).splitlines()[0]}): a shard may have been truncated or removed while training read it",
                         f"check the set with iosd-shards verify {where}, restore or regenerate the damaged shards, {self._then()}")

    def _then(self) -> str:
        """How to go on after a fault: from the last checkpoint once there is one."""
        return "then rerun with --resume" if (self.run_dir / ckpt.CHECKPOINT_NAME).exists() else "then rerun the same command"

    def _catch_interrupt(self):
        """Single process: Ctrl-C finishes the step, saves a checkpoint and stops."""
        if self.env.active or not _main_thread():
            return None

        def handler(signum, frame):
            if self.stop_requested:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.progress is not None:
                self.progress.print("interrupted: saving a checkpoint after this step (Ctrl-C again to abort)")

        return signal.signal(signal.SIGINT, handler)

    def _stop_agreed(self) -> bool:
        return self.stop_requested


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, explicit: frozenset[str] | None = None) -> dict:
    """Train a head as configured; returns a summary (run directory, final loss, val mIoU)."""
    return Trainer(cfg, explicit).run()
