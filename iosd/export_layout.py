"""The layouts ``iosd-synth`` exports, in one place: writers and readers (tests, the Protocol II
script, MMSegmentation configs) import these names instead of spelling paths themselves.

- ``coco``: ``annotations/instances_<split>.json`` (COCO instances, RLE masks as pycocotools
  writes them) and ``images/<split>/<key>.png``.
- ``semantic``: MMSegmentation's custom-dataset layout: ``img_dir/<split>/<key>.png`` and
  ``ann_dir/<split>/<key>.png`` (uint8 label map: 0 background, class i+1 for ``classes[i]``,
  255 ignored), with ``classes.json`` = {"classes": [...incl. "background"], "palette": [[r,g,b]...]}.
- ``shards``: an iosd shard set (``iosd.schema``), so the same images can train a head.
Every export also carries ``preview.png`` (a grid of overlays) and ``synth.json`` (settings,
per-image decisions and the summary counts); ``.synth-parts/`` keeps each finished chunk's
record, so a rerun resumes.
"""

from __future__ import annotations

FORMATS = ("coco", "semantic", "shards")
DEFAULT_SPLIT = "train"

COCO_ANNOTATIONS = "annotations/instances_{split}.json"
COCO_IMAGES = "images/{split}"

SEMANTIC_IMAGES = "img_dir/{split}"
SEMANTIC_LABELS = "ann_dir/{split}"
SEMANTIC_CLASSES = "classes.json"
SEMANTIC_SUFFIX = ".png"
BACKGROUND = "background"
BACKGROUND_ID = 0
IGNORE_ID = 255

PREVIEW = "preview.png"
REPORT = "synth.json"

IMAGE_KEY = "{index:06d}"  # image ``index`` of the plan has this key (file stem, shard key) in every format
PARTS = ".synth-parts"  # finished chunks' records, the settings marker and preview tiles (resume)

# -- a user's own labelled images in: ``iosd-gen --source coco:PATH`` / ``folder:PATH`` ----------
# coco: PATH is an instances JSON; its images are in ``IMAGES_DIR`` when given as
# ``coco:PATH:IMAGES_DIR``, else looked for beside it as COCO lays them out
# (``annotations/instances_val2017.json`` -> ``val2017/``) or as the ``coco`` export above does
# (``annotations/instances_train.json`` -> ``images/train/``).
COCO_ANNOTATIONS_PATTERN = "instances_{split}.json"  # the name that says which split folder holds the images
COCO_IMAGE_DIRS_IN = ("{split}", COCO_IMAGES)  # relative to the folder above ``annotations/``
# folder: ``PATH/images/<stem>.<png|jpg|jpeg>`` and ``PATH/masks/<class name>/<stem>.png``, one
# mask per class the image shows, of the image's size, nonzero = inside (any channel).
FOLDER_IMAGES = "images"
FOLDER_MASKS = "masks"
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_MASK_SUFFIX = ".png"
