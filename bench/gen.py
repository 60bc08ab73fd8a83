"""iosd-gen throughput against a bare diffusers pipeline call on the same prompts (tiny model).

Prints the stage breakdown of one iosd-gen run (diffusion, capture, teacher, encode, write:
encode and write run on worker threads beside diffusion) and the ratio of its samples/s to
``pipe(prompts)`` producing the same images and nothing else. Run: ``python bench/gen.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from iosd.pipeline.generate import GenConfig, Generator
from iosd.pipeline.models import load_model


def bare_pipeline(gen: Generator, n: int, batch: int) -> float:
    """Seconds for the plain diffusers call on the generator's first ``n`` prompts and seeds.

    Runs before iosd-gen, on its own copy of the model, after one untimed warm-up batch: the
    process is as warm for the bare call as for iosd-gen, which follows it.
    """
    cands = [gen.plan.candidate(0, a) for a in range(n)]
    pipe = load_model(gen.cfg.model, device=gen.cfg.device).pipe

    def call(chunk):
        pipe(prompt=[c.prompt for c in chunk], num_inference_steps=gen.cfg.steps, guidance_scale=0.0, height=gen.cfg.resolution, width=gen.cfg.resolution,
             generator=[torch.Generator().manual_seed(c.seed) for c in chunk], output_type="np")

    call(cands[:batch])
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        call(cands[i : i + batch])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True, help="label with the tiny mmdet teacher (needs mmcv)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = {"source": "diffusion", "classes": "coco"} if args.teacher else {"source": "shapes", "classes": "shapes"}
        cfg = GenConfig(**source, model="tiny", num_samples=args.samples, shard_size=args.samples, batch_size=args.batch_size, steps=args.steps, keep_rejected=True, out=f"{tmp}/set", quiet=True)
        gen = Generator(cfg)
        bare = bare_pipeline(gen, args.samples, args.batch_size)
        t0 = time.perf_counter()
        manifest = gen.run()
        # model load and one-off setup (teacher, class embeddings, layer probe) are not throughput
        total = time.perf_counter() - t0 - gen.times.seconds["load"] - gen.times.seconds["setup"]
    n = manifest["counts"]["written"]
    stages = {k: round(v, 3) for k, v in gen.times.seconds.items()}
    report = {
        "samples": n,
        "source": cfg.source,
        "iosd_gen_samples_per_s": round(n / total, 3),
        "bare_pipeline_samples_per_s": round(args.samples / bare, 3),
        "ratio_iosd_gen_to_bare": round((n / total) / (args.samples / bare), 3),
        "stage_seconds": stages,
        "main_thread_seconds": round(sum(stages.get(k, 0) for k in ("diffusion", "capture", "teacher")), 3),
        "wall_seconds": round(total, 3),
        "stored_feature_bytes_per_sample": manifest["features"].get("stored_bytes_per_sample"),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
