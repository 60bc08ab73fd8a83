#!/usr/bin/env bash
# The whole loop on a CPU: the shapes world drawn by the trained world generator (world-sdxl,
# iosd/data/worlds; docs/cpu-world.md). A head trained on the seen shapes segments unseen ones by
# name, next to DAAM on the same generator; not the numbers of the real SDXL-Turbo system.
set -euo pipefail
DEMO=${IOSD_DEMO_DIR:-demo}
SET=$DEMO/shards/shapes1
# --model world-sdxl is a CPU stand-in: it runs recipe "fast" (docs/recipes.md); the papers'
# recipes (iosd, gd) need the real models and GPU hours.
echo "== 1/4 training shards: shapes world, trained world-sdxl, split 1 seen classes, recipe fast"
iosd-gen --recipe fast --classes shapes --source shapes --model ${IOSD_DEMO_MODEL:-world-sdxl} --split 1 --num-samples ${IOSD_DEMO_SAMPLES:-800} --shard-size 100 --batch-size 16 --out "$SET"
iosd-shards verify "$SET"
iosd-shards show "$SET" --n 12
echo "== 2/4 train the recipe's head (iosd-lite) from the shards (no diffusion)"
# 500 steps (half the default) keeps the demo under 10 minutes on 2 CPU cores; the test suite
# trains with the defaults (tests/test_learning.py).
RUN=$DEMO/runs/shapes1-fast
RESUME=""
[ -f "$RUN/checkpoint.json" ] && RESUME="--resume"  # a second `make demo` continues, never clobbers
iosd-train "$SET" --steps ${IOSD_DEMO_STEPS:-500} --out "$RUN" $RESUME ${IOSD_DEMO_TRAIN_ARGS:-}
echo "== 3/4 + 4/4 test shards (seen + unseen classes, with DAAM maps), then mIoU vs DAAM"
iosd-eval --checkpoint "$RUN" --images-per-class ${IOSD_DEMO_IMAGES_PER_CLASS:-20} --report "$DEMO/report"
echo "report: $DEMO/report/report.md (pictures: $DEMO/report/grids/, preview: $SET/preview.png)"
