"""Is the shard loader the bottleneck? Head steps in memory vs loader alone vs real training.

Prints one JSON object, measured in one run on one shard set: optimizer steps/s of the head
on batches already on the device (``in_memory``), samples/s of the loader alone (read tar,
decode zarr, collate, in DataLoader workers), steps/s of real training (the loader feeding
the steps, each batch moved to the device), and the ratio real / in-memory (1.0: the loader
costs nothing) beside loader / head samples/s (above 1: the loader could keep up).

Two kinds of shard sets:
- default: a shapes-world set written with the tiny model (128 px; the CPU world);
- ``--recipe iosd|gd|fast``: a synthetic set whose features have the real 512-px shapes of
  the recipe's layers (SDXL-Turbo's / SD 1.x's UNet probed on the meta device, no weights),
  written through the real writer (``bench/loader.py``'s ``write_set``) in the recipe's
  stored dtype and iosd-gen's default codec; the head, batch size and loss size are the
  recipe's unless given. This is the GPU bench: ``--recipe iosd --device cuda``.

On a CPU the real-size heads are slow: IOSD's official head is ~660 GFLOP fwd+bwd per sample
(GD's ~50, ``fast``'s ~54), i.e. seconds to minutes per step on a few cores, so pass a small
``--steps`` there (``--recipe fast --steps 2 --batch-size 2`` takes about a minute on 2 cores).
Queries are 2048-d for every recipe here (the synthetic writer's width; GD's real ones are
768-d: its first projection is smaller, the rest of the head the same).

Run: ``python bench/train.py [--recipe R] [--device cuda] [--shards DIR] [--head H]
[--batch-size B] [--steps N] [--workers N]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from iosd.errors import user_errors
from iosd.train.data import PREFETCH  # TrainLoader's batches in flight per worker
from iosd.train.heads import KINDS
from iosd.train.trainer import TrainConfig, Trainer

RECIPES = ("iosd", "gd", "fast")


def make_shards(out: str, samples: int) -> str:
    """A shapes-world shard set from the tiny model (the CPU world, 128 px)."""
    from iosd.pipeline.generate import GenConfig, generate

    generate(GenConfig(classes="shapes", source="shapes", model="tiny", split=1, num_samples=samples, shard_size=max(1, samples // 4), batch_size=16, out=out, quiet=True))
    return out


def _bench_loader():
    """bench/loader.py as a module: its real-shape probe and synthetic shard writer."""
    name = "iosd_bench_loader"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("loader.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


def make_recipe_shards(out: str, recipe: str, samples: int, shard_size: int, codec: str, dtype: str | None) -> dict:
    """A synthetic shard set with the real 512-px feature shapes of ``recipe``; returns what
    was written (maps, dtype, codec, bytes per sample on disk)."""
    from iosd.recipes import get_recipe

    loader = _bench_loader()
    r = get_recipe(recipe)
    preset, halves = r.value("gen", "layers"), r.value("gen", "halves")
    if loader.HALVES.get(preset, "cond") != halves:
        raise SystemExit(f"bench/loader.py probes preset {preset!r} with other guidance halves than recipe {recipe!r} ({halves})")
    shapes, source = loader.shapes_of(preset)
    case = loader.Case(preset, dtype or r.value("gen", "feature_dtype"), codec)
    loader.write_set(out, shapes, case, samples, shard_size)
    tars = [p for p in Path(out).glob("*.tar")]
    return {
        "preset": preset,
        "maps": len(shapes),
        "shapes_from": source,
        "feature_dtype": case.dtype,
        "codec": codec,
        "feature_mb_per_sample": round(sum(math.prod(s) for s in shapes.values()) * (1 if case.dtype in ("int8", "fp8") else 2) / 1e6, 2),
        "bytes_per_sample": round(sum(p.stat().st_size for p in tars) / samples),
    }


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, steps: int, warmup: int | None) -> dict:
    """The three rates on a prepared trainer: loader alone, head on device batches, real training."""
    note = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    batch_size, device = trainer.cfg.batch_size, trainer.env.device

    loader = trainer._loader()
    drain = warmup if warmup is not None else max(trainer.workers, 1) * PREFETCH + 1
    try:
        # the first batches, moved to the device now (a batch's buffers are reused by next())
        held = [trainer._to_device(loader.next(note)) for _ in range(max(1, min(4, steps)))]
        for _ in range(max(0, drain - len(held))):  # workers started, their prefetched batches drained
            loader.next(note)
        t0 = time.perf_counter()
        for _ in range(steps):
            loader.next(note)
        loader_s = time.perf_counter() - t0
    finally:
        loader.close()

    trainer.train_step(held[0])  # warm-up: allocator, autograd graph, cuDNN choices
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(held[i % len(held)])
    _sync(device)
    memory_s = time.perf_counter() - t0
    del held

    loader = trainer._loader()
    # on a GPU the first steps eat what the workers prefetched while starting: skip them
    first = warmup if warmup is not None else (1 if device.type == "cpu" else max(trainer.workers, 1) * PREFETCH + 1)
    try:
        for _ in range(max(1, first)):
            trainer.train_step(trainer._to_device(loader.next(note)))
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(trainer._to_device(loader.next(note)))
        _sync(device)
        real_s = time.perf_counter() - t0
    finally:
        loader.close()

    memory_steps, real_steps = rate(steps, memory_s), rate(steps, real_s)
    loader_samples = rate(steps * batch_size, loader_s)
    return {
        "in_memory_steps_per_s": memory_steps,
        "loader_samples_per_s": loader_samples,
        "real_training_steps_per_s": real_steps,
        "ratio_real_to_in_memory": round(real_steps / memory_steps, 3),
        "ratio_loader_to_head_samples": round(loader_samples / (memory_steps * batch_size), 3),
        # the tiny bench's names, in samples/s
        "in_memory_steps_samples_per_s": round(memory_steps * batch_size, 3),
        "loader_only_samples_per_s": loader_samples,
        "real_training_samples_per_s": round(real_steps * batch_size, 3),
    }


def head_cost(trainer: Trainer) -> float | None:
    """GFLOP of one fwd+bwd per sample (one query, as the synthetic samples hold)."""
    from iosd.train.heads import head_gflops

    try:
        config = trainer.head.config
        options = {k: v for k, v in config.items() if k not in ("kind", "layout")}
        return round(head_gflops(config["kind"], config["layout"], queries=1, **options), 1)
    except Exception:  # a head whose config does not round-trip: the cost is a nicety
        return None


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default=None, help="shard directory [default: write a set to a temp dir]")
    parser.add_argument("--recipe", default=None, choices=RECIPES, help="write a set with the real 512-px feature shapes of this recipe and train its head [default: the tiny model's shapes world]")
    parser.add_argument("--head", default=None, choices=list(KINDS), help="[default: the recipe's; iosd-lite on the tiny world]")
    parser.add_argument("--batch-size", type=int, default=None, help="[default: the recipe's; 8 on the tiny world]")
    parser.add_argument("--steps", type=int, default=40, help="batches timed per measurement")
    parser.add_argument("--warmup", type=int, default=None, help="batches not timed before each loader measurement [default: the prefetched ones]")
    parser.add_argument("--workers", type=int, default=None, help="loader worker processes [default: iosd-train's]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--samples", type=int, default=None, help="samples in the synthetic set [default: 4 batches, at least 8]")
    parser.add_argument("--feature-dtype", default=None, help="stored dtype of the synthetic set [default: the recipe's]")
    parser.add_argument("--codec", default=None, help="codec of the synthetic set [default: iosd-gen's]")
    parser.add_argument("--tmp", default=None, help="where the shard set is written [default: a temp dir, removed]")
    args = parser.parse_args()
    if args.steps <= 0:
        parser.error("--steps must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible")
    if args.recipe is None and (args.feature_dtype or args.codec or args.samples):
        parser.error("--feature-dtype, --codec and --samples shape the synthetic set of --recipe")
    from iosd.featstore import DEFAULT_CODEC

    written: dict = {}
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="iosd-bench-train-") as tmp:
        if args.shards:
            shards = args.shards
        elif args.recipe:
            batch = args.batch_size or 8
            samples = args.samples or max(8, 4 * batch)
            workers = max(1, args.workers or os.cpu_count() or 1)
            shards = f"{tmp}/set"
            t0 = time.perf_counter()
            written = make_recipe_shards(shards, args.recipe, samples, max(1, samples // max(4, workers)), args.codec or DEFAULT_CODEC, args.feature_dtype)
            written["write_s"] = round(time.perf_counter() - t0, 1)
        else:
            shards = make_shards(f"{tmp}/set", 200)
        head = args.head or (None if args.recipe else "iosd-lite")
        batch_size = args.batch_size or (None if args.recipe else 8)
        cfg = TrainConfig(shards=shards, recipe=args.recipe, head=head, batch_size=batch_size, steps=10**9, out=f"{tmp}/run", workers=args.workers, device=args.device, quiet=True, tensorboard=False)
        trainer = Trainer(cfg)
        trainer._prepare()
        trainer._build()
        rates = measure(trainer, args.steps, args.warmup)
    gflop = head_cost(trainer)
    report = {
        "recipe": trainer.cfg.recipe,
        "head": trainer.cfg.head,
        "device": str(trainer.env.device),
        "amp": trainer.amp,
        "workers": trainer.workers,
        "batch_size": trainer.cfg.batch_size,
        "steps_timed": args.steps,
        "layout": written or {"shards": shards},
        "head_gflop_fwd_bwd_per_sample": gflop,
        **rates,
    }
    if gflop:
        report["in_memory_tflop_per_s"] = round(gflop * rates["in_memory_steps_per_s"] * trainer.cfg.batch_size / 1e3, 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
