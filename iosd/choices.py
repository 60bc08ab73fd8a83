"""The values the command-line options offer, defined once for the CLIs and the modules that act
on them. Kept apart from those modules (torch, zarr) so that ``--help`` imports nothing heavy:
this module must import nothing but the standard library."""

from __future__ import annotations

# -- iosd-gen ------------------------------------------------------------------------------------
# How a class's instances become its one mask: both papers take the top instance of the label
# (IOSD: the first, highest-scoring one); "union" joins every instance above the threshold.
GT_RULES = ("top", "union")
POOLINGS = ("mean", "first")  # GD: the class-name tokens averaged; IOSD: the name's first token
HIDDEN_STATES = ("penultimate", "final")  # SDXL's conditioning layer; SD v1's (after the final norm)
DEFAULT_CALIBRATION = 64  # --project: candidates whose features fit the basis
CODEC_NAMES = ("blosc-zstd", "blosc-lz4", "none")  # the keys of iosd.featstore.CODECS
# Uncompressed by default: lossless codecs gain 1.04-1.15x on activations (bench/codecs.py)
# and halve the loader's rate (bench/loader.py: IOSD's 19 maps 110-141 vs 38 samples/s per
# worker) and the encoder's; fp8, int8 and --project are the ways to fewer bytes.
DEFAULT_CODEC = "none"
# The teachers that label generated images (pipeline/teachers/, thresholds in
# iosd/data/teachers.json): mmdet's Mask R-CNN, the papers' (its COCO labels only, needs mmcv),
# and text-prompted ones that label any class name (transformers only).
TEACHER_NAMES = ("mmdet", "sam3", "grounding-dino+sam2", "owlv2+sam")
DEFAULT_TEACHER = "mmdet"
TEXT_TEACHERS = TEACHER_NAMES[1:]
# iosd-eval --baselines: DAAM (cross-attention maps stored in the test shards) and any
# text-prompted teacher applied straight to the test images.
BASELINE_NAMES = ("daam", *TEXT_TEACHERS)

# -- iosd-train ----------------------------------------------------------------------------------
HEAD_KINDS = ("iosd", "gd", "iosd-lite", "gd-lite")  # the keys of iosd.train.heads.HEADS
SCHEDULES = ("constant", "cosine", "step")
SUBSETS = ("seen", "all")
LOSS_SIZES = ("image", "head")  # the loss at the image's resolution (the papers), or the head's own map
