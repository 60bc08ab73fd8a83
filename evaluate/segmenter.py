"""A standard segmenter (MMSegmentation) trained and scored on ``semantic`` exports.

GD's Protocol II asks whether a dataset labelled by the grounding head can train an ordinary
segmenter that then works on images no diffusion model touched. This module is that ordinary
segmenter: a real MMSeg architecture from its registry (SegFormer's MiT encoder and all-MLP
head, or UNet + FCN head) at widths that train on a CPU in about a minute, fed by MMSeg's own
dataset class and transforms, trained with its ``train_step`` and scored with its ``IoUMetric``
arithmetic (per-class IoU = summed intersections / summed unions). Nothing here is iosd-specific
but the layout names (``iosd.export_layout``), so any MMSeg user can rerun it from a config.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iosd.errors import UserError
from iosd.evaluate.exact_set import semantic_class_list
from iosd.export_layout import (
    DEFAULT_SPLIT,
    IGNORE_ID,
    SEMANTIC_IMAGES,
    SEMANTIC_LABELS,
    SEMANTIC_SUFFIX,
)

ARCHITECTURES = ("segformer", "unet")
# ImageNet statistics, as every MMSeg config normalises
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


@dataclass
class SegmenterConfig:
    """What to train: the architecture at CPU widths and a short AdamW schedule."""

    architecture: str = "segformer"
    width: int = 16  # SegFormer: first stage's channels (MiT-B0 has 32); UNet: base channels
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def mmseg_scope() -> Iterator[None]:
    """MMSeg's registry scope for the duration (the teacher sets mmdet's in the same process)."""
    try:
        import mmseg.models  # noqa: F401  (registers the architectures)
        from mmengine.registry import DefaultScope
    except ImportError as err:
        raise UserError(f"MMSegmentation is not installed ({err})", "run `make mmcv` (scripts/install-mmcv.sh)") from None
    with DefaultScope.overwrite_default_scope("mmseg"):
        yield


def model_config(architecture: str, num_classes: int, width: int, size: int) -> dict:
    """An MMSeg ``EncoderDecoder`` config dict, as MMSeg's own config files spell it."""
    norm = dict(type="BN", requires_grad=True)
    loss = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True)  # synth maps hold ignored pixels
    preprocessor = dict(type="SegDataPreProcessor", mean=MEAN, std=STD, bgr_to_rgb=True, pad_val=0, seg_pad_val=IGNORE_ID, size=(size, size))
    if architecture == "segformer":  # configs/_base_/models/segformer_mit-b0.py, narrower
        dims = [width, 2 * width, 5 * width, 8 * width]
        backbone = dict(type="MixVisionTransformer", in_channels=3, embed_dims=width, num_stages=4, num_layers=[1, 1, 1, 1], num_heads=[1, 2, 5, 8], patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1], out_indices=(0, 1, 2, 3), mlp_ratio=4, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1)
        head = dict(type="SegformerHead", in_channels=dims, in_index=[0, 1, 2, 3], channels=4 * width, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False, loss_decode=loss)
    elif architecture == "unet":  # configs/_base_/models/fcn_unet_s5-d16.py, narrower and 4 stages
        backbone = dict(type="UNet", in_channels=3, base_channels=width, num_stages=4, strides=(1, 1, 1, 1), enc_num_convs=(2, 2, 2, 2), dec_num_convs=(2, 2, 2), downsamples=(True, True, True), enc_dilations=(1, 1, 1, 1), dec_dilations=(1, 1, 1), norm_cfg=norm, act_cfg=dict(type="ReLU"), upsample_cfg=dict(type="InterpConv"), norm_eval=False)
        head = dict(type="FCNHead", in_channels=width, in_index=3, channels=width, num_convs=1, concat_input=False, dropout_ratio=0.1, num_classes=num_classes, norm_cfg=norm, align_corners=False, loss_decode=loss)
    else:
        raise UserError(f"unknown segmenter architecture {architecture!r}", f"use one of {', '.join(ARCHITECTURES)}")
    return dict(type="EncoderDecoder", data_preprocessor=preprocessor, backbone=backbone, decode_head=head, train_cfg=dict(), test_cfg=dict(mode="whole"))


def seg_dataset(root: str | Path, *, split: str = DEFAULT_SPLIT, train: bool = False):
    """MMSeg's ``BaseSegDataset`` over a semantic export, its metainfo from ``classes.json``
    (random flips when ``train``)."""
    from mmcv.transforms import LoadImageFromFile, RandomFlip
    from mmseg.datasets import BaseSegDataset
    from mmseg.datasets.transforms import LoadAnnotations, PackSegInputs

    from iosd.pipeline.export import read_semantic_classes

    root = Path(root)
    classes = semantic_class_list(root)
    images, labels = SEMANTIC_IMAGES.format(split=split), SEMANTIC_LABELS.format(split=split)
    if not (root / labels).is_dir():
        raise UserError(f"{root / labels} is missing", "point at a semantic export (img_dir/, ann_dir/, classes.json)")
    pipeline = [LoadImageFromFile(), LoadAnnotations()] + ([RandomFlip(prob=0.5)] if train else []) + [PackSegInputs()]
    dataset = BaseSegDataset(
        data_root=str(root),
        data_prefix=dict(img_path=images, seg_map_path=labels),
        img_suffix=SEMANTIC_SUFFIX,
        seg_map_suffix=SEMANTIC_SUFFIX,
        metainfo=dict(classes=tuple(classes), palette=read_semantic_classes(root).get("palette")),
        pipeline=pipeline,
        ignore_index=IGNORE_ID,
    )
    if len(dataset) == 0:
        raise UserError(f"{root / images} holds no images", "export a dataset there first")
    return dataset


def _image_side(dataset) -> int:
    from PIL import Image

    with Image.open(dataset.get_data_info(0)["img_path"]) as img:
        return max(img.size)


def _seeded_loader(dataset, batch_size: int, seed: int, shuffle: bool):
    from mmengine.dataset import pseudo_collate

    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=pseudo_collate, generator=generator, num_workers=0, drop_last=shuffle and len(dataset) >= batch_size)


@dataclass
class TrainedSegmenter:
    """A trained MMSeg model with the class list it predicts (background first)."""

    model: torch.nn.Module
    classes: list[str]
    config: SegmenterConfig
    final_loss: float


def train_segmenter(root: str | Path, config: SegmenterConfig, *, split: str = DEFAULT_SPLIT, progress: Callable[[int, int, float], None] | None = None) -> TrainedSegmenter:
    """Train ``config.architecture`` from scratch on a semantic export, deterministically."""
    from mmengine.config import ConfigDict
    from mmengine.optim import OptimWrapper
    from mmengine.runner import set_random_seed
    from mmseg.registry import MODELS

    if config.steps <= 0 or config.batch_size <= 0 or config.width <= 0:
        raise UserError(f"segmenter steps, batch size and width must be positive (got {config.steps}, {config.batch_size}, {config.width})", "pass numbers > 0")
    classes = semantic_class_list(root)
    with mmseg_scope():
        set_random_seed(config.seed)
        dataset = seg_dataset(root, split=split, train=True)
        model = MODELS.build(ConfigDict(model_config(config.architecture, len(classes), config.width, _image_side(dataset))))
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
        wrapper = OptimWrapper(optimizer)
        step, loss = 0, math.nan
        epoch = 0
        while step < config.steps:
            for batch in _seeded_loader(dataset, config.batch_size, config.seed + epoch, shuffle=True):
                logs = model.train_step(batch, wrapper)
                schedule.step()
                step += 1
                loss = logs["loss"].item()
                if progress is not None:
                    progress(step, config.steps, loss)
                if step >= config.steps:
                    break
            epoch += 1
    model.eval()
    return TrainedSegmenter(model, classes, config, loss)


def _label_lookup(model_classes: list[str], test_classes: list[str], where: Path) -> np.ndarray:
    """Maps a test set's label ids onto the model's (the two exports may order classes apart)."""
    missing = [c for c in test_classes if c not in model_classes]
    if missing:
        raise UserError(f"{where} has classes the segmenter never learned: {', '.join(missing)}", "score on a set of the training classes")
    lookup = np.full(256, IGNORE_ID, np.uint8)
    for i, name in enumerate(test_classes):
        lookup[i] = model_classes.index(name)
    return lookup


@torch.no_grad()
def predict_labels(trained: TrainedSegmenter, root: str | Path, *, split: str = DEFAULT_SPLIT, batch_size: int = 16) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(image path, predicted label map, true label map in the model's ids) per test image."""
    test_classes = semantic_class_list(root)
    lookup = torch.from_numpy(_label_lookup(trained.classes, test_classes, Path(root)).astype(np.int64))
    with mmseg_scope():
        dataset = seg_dataset(root, split=split)
        for batch in _seeded_loader(dataset, batch_size, 0, shuffle=False):
            for sample in trained.model.test_step(batch):
                truth = lookup[sample.gt_sem_seg.data.squeeze(0).long()]
                yield sample.img_path, sample.pred_sem_seg.data.squeeze(0).numpy(), truth.numpy()


def score_segmenter(trained: TrainedSegmenter, root: str | Path, *, split: str = DEFAULT_SPLIT, keep: int = 0) -> dict:
    """Per-class IoU (MMSeg's IoUMetric arithmetic) of ``trained`` on a semantic export.

    ``miou`` is the mean over the foreground classes present in the test set (the classes the
    protocol is about); ``miou_with_background`` adds the background as MMSeg's tables do.
    The first ``keep`` predictions come back under ``examples`` for pictures."""
    from mmseg.evaluation import IoUMetric

    n = len(trained.classes)
    totals = [torch.zeros(n, dtype=torch.float64) for _ in range(4)]
    examples, images = [], 0
    for path, pred, truth in predict_labels(trained, root, split=split):
        areas = IoUMetric.intersect_and_union(torch.from_numpy(pred).long(), torch.from_numpy(truth).long(), n, IGNORE_ID)
        for total, area in zip(totals, areas, strict=True):
            total += area.double()
        if len(examples) < keep:
            examples.append((path, pred, truth))
        images += 1
    metrics = IoUMetric.total_area_to_metrics(*totals, ["mIoU"])
    present = [i for i in range(n) if totals[3][i] > 0]
    per_class = {trained.classes[i]: (None if math.isnan(metrics["IoU"][i]) else float(metrics["IoU"][i])) for i in present}
    foreground = [per_class[trained.classes[i]] for i in present if i > 0 and per_class[trained.classes[i]] is not None]
    everything = [v for v in per_class.values() if v is not None]
    return {
        "images": images,
        "per_class_iou": per_class,
        "miou": float(np.mean(foreground)) if foreground else None,
        "miou_with_background": float(np.mean(everything)) if everything else None,
        "pixel_accuracy": float(metrics["aAcc"]),
        "examples": examples,
    }
