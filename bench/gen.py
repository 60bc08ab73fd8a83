"""iosd-gen throughput against a bare diffusers pipeline call on the same prompts, and the
encode+write rate that must keep up with a GPU.

Default mode: the stage breakdown of one iosd-gen run (diffusion, capture, teacher, encode,
write: encode and write run on worker threads beside diffusion) and the ratio of its
samples/s to ``pipe(prompts)`` producing the same images and nothing else. The bare call
runs the recipe's steps, guidance and scheduler as iosd-gen resolves them
(``GenConfig.with_recipe``, then ``load_configured``), so the ratio is the cost of iosd's
capture, teacher and writing, not of different settings. ``--model`` is ``tiny`` (the CPU
stand-in), ``tiny-sd1``, or a local SDXL / SD 1.x diffusers directory (e.g. one from
``scripts/build-real-model.py``); ``--recipe`` picks the settings (default: the model's).
With a local directory and no teacher options the teacher is mmdet's R50 Mask R-CNN with
random weights (as for the tiny model): an offline GPU box cannot fetch the real one.

``--encode-only``: no model. For each recipe, features of its real 512-px shapes (random
normal, quantised to the stored dtype as iosd-gen does where the UNet ran) go
through iosd-gen's own encode path (``Generator._encode``: featstore encode in the recipe's
stored dtype with the default codec, PNG, masks, sample record) and its shard writer (tar,
sha256, manifest). Prints, per recipe, encode+write
samples/s per thread (from the process's CPU seconds, so other load on a shared machine does
not count), the wall-clock rate with every local core, and the projection to 16 threads
(16 x the per-thread rate: ``iosd-gen --workers 16`` runs 16 encode threads beside
``shard_writers(16)`` threads each writing its own shard, so no stage is held to one thread),
against the 40 samples/s that one GPU makes with SDXL-Turbo at one step (issue 10). Random
features compress less than real activations (~1.15x with blosc-zstd), so compressed bytes
are a little pessimistic.

``--teacher-name`` picks the teacher (mmdet, sam3, grounding-dino+sam2, owlv2+sam) and the
output reports its share of generation time (of the main thread and of the wall clock); at real
sizes pass the real models (``--teacher-model DIRS`` offline), else a text-prompted teacher is
its tiny random-weight config, like the R50 above.

Run: ``python bench/gen.py [--model DIR] [--recipe R] [--no-teacher] [--teacher-name sam3]`` or
``python bench/gen.py --encode-only [--recipe R]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import torch

from iosd.choices import TEACHER_NAMES
from iosd.errors import user_errors
from iosd.featstore import DEFAULT_CODEC
from iosd.layers import FEATURE_DTYPES
from iosd.pipeline.generate import GenConfig, Generator, load_configured, shard_writers
from iosd.pipeline.models import TINY_MODELS

RECIPES = ("iosd", "gd", "fast")
TARGET_SAMPLES_PER_S = 40.0  # one current GPU, SDXL-Turbo, one step (issue 10)
PROJECTED_THREADS = 16  # the cores of a typical GPU box


class BenchGenerator(Generator):
    """iosd-gen's generator; with ``random_teacher`` its teacher is mmdet's R50 Mask R-CNN
    with random weights at the recipe's resolution (the tiny model's), for a local model
    directory on a machine that cannot fetch the real teacher."""

    random_teacher = False

    def _teacher(self):
        if not self.random_teacher or self.cfg.source == "shapes":
            return super()._teacher()
        from iosd.pipeline.teachers import build_teacher, options_from_config

        return build_teacher(options_from_config(asdict(self.cfg), str(self.loaded.device), tiny=True))


def bare_pipeline(gen: Generator, n: int, batch: int) -> float:
    """Seconds for the plain diffusers call on the generator's first ``n`` prompts and seeds,
    with the resolved config's scheduler, steps, guidance and resolution.

    Runs before iosd-gen, on its own copy of the model (freed before iosd-gen loads its
    own), after one untimed warm-up batch, with iosd-gen's torch thread count: the process
    is as warm for the bare call as for iosd-gen, which follows it.
    """
    cfg = gen.cfg
    cands = [gen.plan.candidate(0, a) for a in range(n)]
    loaded = load_configured(asdict(cfg), cfg.device)

    def call(chunk):
        loaded.pipe(prompt=[c.prompt for c in chunk], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.resolution, width=cfg.resolution,
                    generator=[torch.Generator().manual_seed(c.seed) for c in chunk], output_type="np")
        if loaded.device.type == "cuda":
            torch.cuda.synchronize(loaded.device)

    threads = torch.get_num_threads()
    if loaded.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # as Generator.setup: iosd-gen leaves cores to its encode threads (oversubscribed
        # OpenMP spins slow diffusion several-fold); the bare call gets the same share
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - cfg.workers))
    try:
        call(cands[:batch])
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            call(cands[i : i + batch])
        return time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def generation(args: argparse.Namespace) -> dict:
    """One iosd-gen run against the bare pipeline call on the same prompts."""
    model = args.model or "tiny"
    source = {"source": "diffusion", "classes": "coco"} if args.teacher else {"source": "shapes", "classes": "shapes"}
    teacher = {"teacher_config": args.teacher_config, "teacher_checkpoint": args.teacher_checkpoint, "teacher_model": args.teacher_model}
    with tempfile.TemporaryDirectory(prefix="iosd-bench-gen-") as tmp:
        cfg = GenConfig(**source, **teacher, teacher=None if args.teacher_name == "mmdet" else args.teacher_name, model=model, recipe=args.recipe, num_samples=args.samples, shard_size=args.samples, batch_size=args.batch_size, steps=args.steps,
                        resolution=args.resolution, device=args.device, workers=args.workers, keep_rejected=True, out=f"{tmp}/set", quiet=True)
        gen = BenchGenerator(cfg)
        gen.random_teacher = args.teacher and model not in TINY_MODELS and not any(teacher.values())
        bare = bare_pipeline(gen, args.samples, args.batch_size)
        gc.collect()  # the bare call's model copy, before iosd-gen loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        manifest = gen.run()
        # model load and one-off setup (teacher, class embeddings, layer probe) are not throughput
        total = time.perf_counter() - t0 - gen.times.seconds["load"] - gen.times.seconds["setup"]
    n = manifest["counts"]["written"]
    stages = {k: round(v, 3) for k, v in gen.times.seconds.items()}
    c = gen.cfg
    return {
        "model": model,
        "family": manifest["model"].get("family"),
        "recipe": c.recipe,
        "device": str(gen.loaded.device),
        "settings": {"scheduler": c.scheduler, "steps": c.steps, "guidance": c.guidance, "resolution": c.resolution, "layers": c.layers, "halves": c.halves, "feature_dtype": c.feature_dtype, "codec": c.codec},
        "teacher": (manifest.get("teacher") or {}).get("name") or (manifest.get("teacher") or {}).get("kind") if not gen.random_teacher else f"{args.teacher_name}, random weights (tiny)",
        "samples": n,
        "source": c.source,
        "iosd_gen_samples_per_s": round(n / total, 3),
        "bare_pipeline_samples_per_s": round(args.samples / bare, 3),
        "ratio_iosd_gen_to_bare": round((n / total) / (args.samples / bare), 3),
        "stage_seconds": stages,
        "main_thread_seconds": round(sum(stages.get(k, 0) for k in ("diffusion", "capture", "teacher")), 3),
        # the teacher's share of generation: of the main thread (diffusion, capture, teacher) and of the wall clock
        "teacher_share_of_main_thread": round(stages.get("teacher", 0) / max(1e-9, sum(stages.get(k, 0) for k in ("diffusion", "capture", "teacher"))), 3),
        "teacher_share_of_wall": round(stages.get("teacher", 0) / max(1e-9, total), 3),
        "wall_seconds": round(total, 3),
        "stored_feature_bytes_per_sample": manifest["features"].get("stored_bytes_per_sample"),
    }


def encode_rates(recipe: str, samples: int, threads: int, codec: str, feature_dtype: str | None = None) -> dict:
    """Encode+write samples/s of iosd-gen's own path on random features of ``recipe``'s real
    512-px shapes (no model: the generator is configured, never set up)."""
    from iosd.layers import layer_key
    from iosd.pipeline.capture import recipe_shapes
    from iosd.pipeline.families import get_family
    from iosd.pipeline.filter import judge
    from iosd.pipeline.shapes import render_scene
    from iosd.pipeline.sources import Produced
    from iosd.pipeline.writer import ShardSetWriter
    from iosd.recipes import get_recipe

    shapes = recipe_shapes(recipe)
    dim = get_family(get_recipe(recipe).family).unet_config()["cross_attention_dim"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="iosd-bench-encode-") as tmp:
        cfg = GenConfig(recipe=recipe, classes="shapes", source="shapes", num_samples=samples, shard_size=samples, codec=codec, feature_dtype=feature_dtype, out=f"{tmp}/set", quiet=True)
        gen = Generator(cfg)
        c = gen.cfg
        gen.embeddings = {name: rng.standard_normal(dim, dtype=np.float32) for name in gen.split.all}
        gen.projection = None
        subsets = {**dict.fromkeys(gen.split.seen, "seen"), **dict.fromkeys(gen.split.unseen, "unseen")}
        # as iosd-gen hands them over: quantised to the stored dtype where the UNet ran (float16
        # there, Produced.store), per sample through Produced.sample_features; on a GPU box that is the device's work
        produced = Produced(images=np.zeros(0), features={p: torch.from_numpy(rng.standard_normal((2, *s), dtype=np.float32)).half() for p, s in shapes.items()})
        produced.store(c.feature_dtype)
        features = [produced.sample_features(b, c.feature_dtype) for b in range(2)]
        jobs = []
        for a in range(samples):
            cand = gen.plan.candidate(0, a)
            image, masks = render_scene(cand.names, np.random.default_rng(cand.seed), c.resolution)
            records, kept = judge(cand.names, list(masks), [1.0] * len(cand.names), subsets, c.min_score, cand.targets)
            jobs.append((cand, image, features[a % 2], records, kept, None))

        def encode_all(workers: int, todo: list) -> tuple[float, float, list[dict]]:
            """(wall s, CPU s of the process, members): encode on ``workers`` threads, as iosd-gen."""
            w0, c0 = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(workers) as pool:
                members = list(pool.map(lambda job: gen._encode(*job), todo))
            return time.perf_counter() - w0, time.process_time() - c0, members

        encode_all(1, jobs[:2])  # warm-up: imports, codec contexts, allocator
        one_wall, one_cpu, members = encode_all(1, jobs)
        many_wall = encode_all(threads, jobs)[0] if threads > 1 else one_wall
        header = {"identity": {"bench": f"encode-{recipe}"}, "features": {"layers": [{"path": p, "key": layer_key(p), "shape": s} for p, s in shapes.items()], "dtype": c.feature_dtype, "codec": c.codec},
                  "embedding": {"dim": dim}, "image_size": [c.resolution, c.resolution]}
        writer = ShardSetWriter(c.out, header, 1)
        writer.prepare()
        w0, c0 = time.perf_counter(), time.process_time()
        writer.write_shard(0, members, {"written": samples, "feature_bytes": sum(len(m["feat.zarr.zip"]) for m in members)})
        writer.write_manifest()
        write_wall, write_cpu = time.perf_counter() - w0, time.process_time() - c0
        sample_bytes = sum(len(v) for m in members for v in m.values() if isinstance(v, bytes)) / samples
    # Rates per thread from CPU seconds: on a shared machine the wall clock counts the time
    # other processes held the core; CPU time is what one core of an idle box would take.
    write_rate = samples / write_cpu
    per_thread = samples / (one_cpu + write_cpu)
    return {
        "case": f"encode-{recipe}",
        "recipe": recipe,
        "maps": len(shapes),
        "feature_dtype": c.feature_dtype,
        "codec": c.codec,
        "raw_feature_mb_per_sample": round(sum(int(np.prod(s)) for s in shapes.values()) * (1 if c.feature_dtype in ("int8", "fp8") else 2) / 1e6, 2),
        "sample_mb": round(sample_bytes / 1e6, 2),
        "samples": samples,
        "encode_write_samples_per_s_per_thread": round(per_thread, 2),
        "encode_cpu_ms_per_sample": round(1e3 * one_cpu / samples, 1),
        "write_cpu_ms_per_sample": round(1e3 * write_cpu / samples, 1),
        "write_gb_per_s_one_thread": round(write_rate * sample_bytes / 1e9, 3),
        "wall_encode_write_samples_per_s_one_thread": round(samples / (one_wall + write_wall), 2),
        "threads": threads,
        "wall_encode_samples_per_s_all_threads": round(samples / many_wall, 2),
        "wall_thread_scaling": round(one_wall / many_wall, 2),
        f"projected_samples_per_s_{PROJECTED_THREADS}_threads": round(PROJECTED_THREADS * per_thread, 1),
        # iosd-gen --workers N runs N encode and shard_writers(N) writer threads: no stage is
        # held to one thread, so the cores' CPU seconds bound the rate
        f"writer_threads_with_{PROJECTED_THREADS}_workers": shard_writers(PROJECTED_THREADS),
        "target_samples_per_s": TARGET_SAMPLES_PER_S,
        "meets_target": PROJECTED_THREADS * per_thread > TARGET_SAMPLES_PER_S,
    }


def _quiet_libraries() -> None:
    """Loading bars and cast notes of diffusers/transformers would bury the JSON."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


@user_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="tiny, tiny-sd1, or a local SDXL / SD 1.x diffusers directory [default: tiny]")
    parser.add_argument("--recipe", default=None, choices=RECIPES, help="settings as iosd-gen resolves them [default: the model's; --encode-only: every recipe]")
    parser.add_argument("--samples", type=int, default=None, help="samples timed [32; --encode-only: 8 per recipe]")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps [the recipe's]")
    parser.add_argument("--resolution", type=int, default=None, help="[the recipe's; 128 for the tiny models]")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="iosd-gen's encode threads")
    parser.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True, help="label with an mmdet teacher (needs mmcv); --no-teacher: the shapes world, exact masks")
    parser.add_argument("--teacher-config", default=None, help="mmdet config of the teacher [random-weight R50 for a local model]")
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--teacher-name", default="mmdet", choices=TEACHER_NAMES, help="iosd-gen's --teacher: whose share of generation time is reported [mmdet]")
    parser.add_argument("--teacher-model", default=None, help="iosd-gen's --teacher-model (local directories of a text-prompted teacher's real models on an offline box)")
    parser.add_argument("--encode-only", action="store_true", help="no model: encode+write rates on each recipe's real feature shapes")
    parser.add_argument("--threads", type=int, default=None, help="--encode-only: the 'all threads' count [os.cpu_count()]")
    parser.add_argument("--codec", default=DEFAULT_CODEC, help="--encode-only: feature codec [iosd-gen's default]")
    parser.add_argument("--feature-dtype", default=None, choices=FEATURE_DTYPES, help="--encode-only: stored dtype [the recipe's]")
    args = parser.parse_args()
    _quiet_libraries()
    if args.encode_only:
        for recipe in [args.recipe] if args.recipe else RECIPES:
            print(json.dumps(encode_rates(recipe, args.samples or 8, args.threads or os.cpu_count() or 1, args.codec, args.feature_dtype)), flush=True)
        return
    args.samples = args.samples or 32
    print(json.dumps(generation(args), indent=1))


if __name__ == "__main__":
    main()
