"""Is the shard loader the bottleneck? Loader alone vs head steps in memory vs real training.

Prints, in one run on one shard set: samples/s of the loader alone (read tar, decode zarr,
collate, in DataLoader workers), of optimizer steps on batches already in memory, and of
real training (loader feeding the steps), plus the ratio real / in-memory (1.0 means the
loader costs nothing). Without ``--shards`` it first writes a shapes-world set with the
tiny model. Run: ``python bench/train.py [--shards DIR] [--head iosd-lite] [--workers N]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from iosd.train.heads import KINDS
from iosd.train.trainer import TrainConfig, Trainer


def make_shards(out: str, samples: int) -> str:
    from iosd.pipeline.generate import GenConfig, generate

    generate(GenConfig(classes="shapes", source="shapes", model="tiny", split=1, num_samples=samples, shard_size=max(1, samples // 4), batch_size=16, out=out, quiet=True))
    return out


def rate(samples: int, seconds: float) -> float:
    return round(samples / seconds, 2) if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shards", default=None, help="shard directory [default: write 200 shapes samples to a temp dir]")
    parser.add_argument("--head", default="iosd-lite", choices=list(KINDS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="batches timed per measurement")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(f"{tmp}/set", 200)
        cfg = TrainConfig(shards=shards, head=args.head, batch_size=args.batch_size, steps=10**9, out=f"{tmp}/run", workers=args.workers, quiet=True, tensorboard=False)
        trainer = Trainer(cfg)
        trainer._prepare()
        trainer._build()
        note = lambda message: None  # noqa: E731
        batch_size, n = args.batch_size, args.steps

        loader = trainer._loader()
        loader.next(note)  # workers started, first shard open
        t0 = time.perf_counter()
        held = [loader.next(note) for _ in range(n)]
        loader_rate = rate(n * batch_size, time.perf_counter() - t0)
        loader.close()

        device_batches = [trainer._to_device(b) for b in held[: min(8, n)]]
        trainer.train_step(device_batches[0])  # warm-up (allocator, autograd graph)
        t0 = time.perf_counter()
        for i in range(n):
            trainer.train_step(device_batches[i % len(device_batches)])
        if trainer.env.device.type == "cuda":
            torch.cuda.synchronize()
        memory_rate = rate(n * batch_size, time.perf_counter() - t0)

        loader = trainer._loader()
        trainer.train_step(trainer._to_device(loader.next(note)))
        t0 = time.perf_counter()
        for _ in range(n):
            trainer.train_step(trainer._to_device(loader.next(note)))
        if trainer.env.device.type == "cuda":
            torch.cuda.synchronize()
        real_rate = rate(n * batch_size, time.perf_counter() - t0)
        loader.close()
    print(json.dumps({
        "head": args.head,
        "device": str(trainer.env.device),
        "workers": trainer.workers,
        "batch_size": batch_size,
        "loader_only_samples_per_s": loader_rate,
        "in_memory_steps_samples_per_s": memory_rate,
        "real_training_samples_per_s": real_rate,
        "ratio_real_to_in_memory": round(real_rate / memory_rate, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
