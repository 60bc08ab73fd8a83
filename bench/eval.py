"""iosd-eval scoring throughput on cached test shards (no diffusion): all of it vs the head alone.

Prints images/s of ``iosd.evaluate.scoring.score`` (decode in DataLoader workers, head
forward, upsampling, DAAM masks, IoU bookkeeping) and of the head's forward pass alone on
batches already in memory, with their ratio (1.0 means everything around the head costs
nothing). Without arguments it first writes a shapes-world set with the tiny model, trains
a head for a few steps and builds its test shards (as iosd-eval would) in a temp dir.
Run: ``python bench/eval.py [--checkpoint RUN --test-shards DIR] [--objects 2]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from iosd.errors import user_errors
from iosd.evaluate.scoring import head_inputs, score, shard_batches


def build(tmp: Path, images_per_class: int, objects: str, train_steps: int, small: bool) -> tuple[Path, Path]:
    """A shapes-world training set, a briefly trained head (weights barely matter for speed)
    and its test shards, built by the same code as iosd-eval's."""
    from iosd.evaluate.testset import ensure_test_shards
    from iosd.pipeline.generate import GenConfig, generate
    from iosd.train.checkpoint import read_checkpoint
    from iosd.train.trainer import TrainConfig, train

    shards, run = tmp / "shapes1", tmp / "run"
    generate(GenConfig(classes="shapes", source="shapes", model="tiny", split=1, num_samples=32, shard_size=16, batch_size=16, out=str(shards), quiet=True))
    options = {"d_model": 64, "ffn": 128} if small else {}
    train(TrainConfig(shards=str(shards), steps=train_steps, batch_size=8, out=str(run), workers=0, head_options=options, tensorboard=False, quiet=True))
    info, _ = read_checkpoint(run)
    return run, ensure_test_shards(info, None, images_per_class, objects, "cpu", quiet=True)


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 2) if seconds > 0 else float("inf")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def head_forward_rate(head: torch.nn.Module, shard_dir: Path, names: list[str], layers: list[str], batch_size: int, device: str, images: int) -> float:
    """Images/s of the head alone, cycling over up to 8 batches held on ``device``."""
    held = []
    for batch in shard_batches(shard_dir, names, layers, batch_size, workers=0):
        held.append((len(batch), head_inputs(batch, layers, device)))
        if len(held) == 8:
            break
    head(*held[0][1])  # warm-up (allocator, kernels)
    _sync(device)
    done, i = 0, 0
    t0 = time.perf_counter()
    while done < images:
        n, inputs = held[i % len(held)]
        head(*inputs)
        done, i = done + n, i + 1
    _sync(device)
    return rate(done, time.perf_counter() - t0)


def measure(run: Path, test_dir: Path, batch_size: int, workers: int, device: str) -> dict:
    """Full scoring once (cold workers included, as iosd-eval runs it), then the head alone."""
    from iosd.classes import ClassSplit
    from iosd.evaluate.testset import check_compatible
    from iosd.manifest import read_manifest
    from iosd.train.checkpoint import load_head

    head, info = load_head(run, device)
    manifest = read_manifest(test_dir)
    check_compatible(info, manifest, ClassSplit.from_json(info["classes"]), test_dir)
    names, layers = [s["name"] for s in manifest["shards"]], [p for p, _ in info["layout"]["layers"]]
    images = manifest["counts"]["written"]
    t0 = time.perf_counter()
    scores = score(head, test_dir, names, layers, gt_min_score=0.8, batch_size=batch_size, device=device, workers=workers)
    _sync(device)
    scored = rate(images, time.perf_counter() - t0)
    alone = head_forward_rate(head, test_dir, names, layers, batch_size, device, images)
    return {
        "device": device,
        "head": info["head"].get("kind"),
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "test_images": images,
        "objects": str((manifest.get("config") or {}).get("objects", "1")),
        "batch_size": batch_size,
        "workers": workers,
        "methods": sorted(scores.methods),
        "score_images_per_s": scored,
        "head_forward_images_per_s": alone,
        "ratio_score_to_head_forward": round(scored / alone, 3),
    }


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="run directory of iosd-train (with --test-shards)")
    parser.add_argument("--test-shards", type=Path, default=None, help="test shards of that run's split and layers (with --checkpoint)")
    parser.add_argument("--images-per-class", type=int, default=8, help="built test set: images per class")
    parser.add_argument("--objects", choices=["1", "2"], default="1", help="built test set: objects per prompt")
    parser.add_argument("--train-steps", type=int, default=5, help="built head: optimizer steps")
    parser.add_argument("--small-head", action="store_true", help="built head: d_model 64, ffn 128 instead of the default size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes of the scoring loader")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.test_shards is None):
        parser.error("--checkpoint and --test-shards go together (pass both, or neither to build a shapes-world set)")
    from iosd.pipeline.models import pick_device

    device = str(pick_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint is None:
            run, test_dir = build(Path(tmp), args.images_per_class, args.objects, args.train_steps, args.small_head)
        else:
            run, test_dir = args.checkpoint, args.test_shards
        report = measure(run, test_dir, args.batch_size, args.workers, device)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
