"""Train the CPU world's teacher: mmdet's own Mask R-CNN, narrowed to a CPU budget, on the
shapes world's scenes with their exact masks.

Why: ``--source diffusion`` on the trained world must be labelled by a real detector with real
mistakes (what the papers' 0.8 filter is there to catch), and mmdet's COCO detectors know no
shape. The model is mmdet's ``MaskRCNN`` built from its registry (ResNet-18 layout at
``width`` base channels, FPN, the standard RPN and RoI heads at the FPN's width); only the
training loop is ours, the resumable one of train/world.py (``Checkpointed``/``run_loop``).

Scenes are drawn as the world's are (every shapes class, one or two objects, random hues from
``random_colours``, ``WORLD_SIDE`` px) from (seed, step) alone, so a rerun with the same
arguments draws the same batches and a killed run resumes to the same weights. They are
upscaled to ``side`` px as the shipped test pipeline upscales a generated image: the standard
anchors and RoI sizes fit objects of 30-100 px, not the world's 15-50.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from iosd.classes import load_split
from iosd.errors import UserError
from iosd.manifest import replace_directory, share_like_output, write_bytes_atomic
from iosd.world_teachers import CONFIG_FILE, RECORD, WEIGHTS_FILE
from iosd.worlds import WORLD_SIDE, directory_digests

BASE_CONFIG = "mask-rcnn_r50_fpn_1x_coco"  # mmdet's own Mask R-CNN, narrowed below
TRAIN_STREAM, EVAL_STREAM = 1, 2  # rng streams: held-out scenes never share a draw with training


@dataclass
class TeacherConfig:
    """One teacher training run; everything that changes the weights is here (and recorded).
    ``warmup``, ``save_every`` and ``batch_size`` are what train/world.py's ``run_loop`` reads."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    save_every: int = 100
    side: int = 128  # px the world's 64 px scenes are upscaled to, in training and at test time
    width: int = 16  # ResNet-18 base channels (64 in the standard one)
    fpn: int = 64  # FPN, RPN and RoI head channels (256 in the standard one)
    fc: int = 256  # the box head's fully connected width (1024 in the standard one)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every", "side", "width", "fpn", "fc"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1", f"pass a positive --{name.replace('_', '-')}")
        if self.side % 32:
            raise UserError(f"--side {self.side} is not a multiple of 32", "pass --side 128 or 256 (the FPN's coarsest stride is 32)")


def teacher_classes() -> list[str]:
    """Every class of the shapes world, seen and unseen alike: the teacher labels them all."""
    return list(load_split("shapes", 1).all)


# ---------------------------------------------------------------------------------------
# The model: mmdet's config objects, narrowed.
# ---------------------------------------------------------------------------------------
def model_config(cfg: TeacherConfig, classes: list[str]):
    """The mmengine Config of the teacher: mmdet's r50 Mask R-CNN with a ResNet-18 of ``width``
    base channels trained from scratch (BN in training mode, nothing frozen), FPN and heads at
    ``fpn`` channels, and a test pipeline that upscales any square image to ``side`` px."""
    from mmengine.config import Config

    from iosd.pipeline.teacher import _quiet, resolve_config

    with _quiet():
        base = Config.fromfile(str(resolve_config(BASE_CONFIG)))
    model = base.model
    w, f = cfg.width, cfg.fpn
    model.backbone.update(depth=18, base_channels=w, frozen_stages=-1, norm_eval=False, init_cfg=None)
    model.neck.update(in_channels=[w, 2 * w, 4 * w, 8 * w], out_channels=f)
    model.rpn_head.update(in_channels=f, feat_channels=f)
    model.roi_head.bbox_roi_extractor.update(out_channels=f)
    model.roi_head.bbox_head.update(in_channels=f, fc_out_channels=cfg.fc, num_classes=len(classes))
    model.roi_head.mask_roi_extractor.update(out_channels=f)
    model.roi_head.mask_head.update(in_channels=f, conv_out_channels=f, num_classes=len(classes))
    # few objects per scene: fewer proposals keep a CPU step cheap (mmdet's are for COCO's crowds)
    model.train_cfg.rpn_proposal.update(nms_pre=1000, max_per_img=300)
    model.train_cfg.rcnn.sampler.update(num=128)
    model.test_cfg.rpn.update(nms_pre=500, max_per_img=100)
    model.test_cfg.rcnn.max_per_img = 20
    model.pop("init_cfg", None)
    pipeline = [
        {"type": "LoadImageFromFile"},
        {"type": "Resize", "scale": (cfg.side, cfg.side), "keep_ratio": True},
        {"type": "PackDetInputs", "meta_keys": ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")},
    ]
    metainfo = {"classes": tuple(classes)}
    return Config({
        "default_scope": "mmdet",
        "model": model.to_dict(),
        "metainfo": metainfo,
        "test_pipeline": pipeline,
        "test_dataloader": {"dataset": {"type": "CocoDataset", "metainfo": metainfo, "pipeline": pipeline}},
    })


def build_model(config, seed: int) -> torch.nn.Module:
    """The detector from mmdet's registry, its random initialisation drawn from ``seed``."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from iosd.pipeline.teacher import _quiet

    init_default_scope("mmdet")
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS.build(config.model)
        model.init_weights()
    return model


# ---------------------------------------------------------------------------------------
# Scenes: the world's, with exact masks, from (seed, stream, index) alone.
# ---------------------------------------------------------------------------------------
def draw_scene(rng: np.random.Generator, classes: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One scene as the world draws its training scenes (train/world.py ``draw_objects``);
    RGB uint8 (WORLD_SIDE, WORLD_SIDE, 3), its visible masks, their names. An object that ends
    up with no visible pixel is dropped (it cannot be a box)."""
    from iosd.train.world import draw_objects

    image, masks, names, _ = draw_objects(rng, classes)
    keep = [i for i in range(len(names)) if masks[i].any()]
    return image, masks[keep], [names[i] for i in keep]


def held_out_scenes(seed: int, count: int, classes: list[str]) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """``count`` scenes from the evaluation stream: never drawn by any training step."""
    return [draw_scene(np.random.default_rng([seed, EVAL_STREAM, i]), classes) for i in range(count)]


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float32 x0, y0, x1, y1 boxes enclosing each (non-empty) mask's pixels."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def _sample(image: np.ndarray, masks: np.ndarray, labels: list[int], side: int, flip: bool):
    """(input tensor, DetDataSample) of one scene upscaled to ``side`` as the test pipeline
    upscales (mmcv bilinear; masks nearest), in the BGR order mmdet's loaders give."""
    import mmcv
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    if flip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    big = mmcv.imresize(np.ascontiguousarray(image[..., ::-1]), (side, side), interpolation="bilinear")
    bitmaps = BitmapMasks(np.ascontiguousarray(masks).astype(np.uint8), WORLD_SIDE, WORLD_SIDE).resize((side, side))
    instances = InstanceData()
    instances.bboxes = torch.from_numpy(mask_boxes(bitmaps.masks))
    instances.labels = torch.tensor(labels, dtype=torch.long)
    instances.masks = bitmaps
    scale = side / WORLD_SIDE
    sample = DetDataSample(metainfo={"img_shape": (side, side), "ori_shape": (WORLD_SIDE, WORLD_SIDE), "scale_factor": (scale, scale)})
    sample.gt_instances = instances
    return torch.from_numpy(big).permute(2, 0, 1).contiguous(), sample


def training_batch(cfg: TeacherConfig, classes: list[str], step: int) -> dict:
    """Step ``step``'s batch, drawn from (seed, step) alone."""
    rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, step])
    inputs, samples = [], []
    for _ in range(cfg.batch_size):
        image, masks, names = draw_scene(rng, classes)
        tensor, sample = _sample(image, masks, [classes.index(n) for n in names], cfg.side, bool(rng.random() < 0.5))
        inputs.append(tensor)
        samples.append(sample)
    return {"inputs": inputs, "data_samples": samples}


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------
def _step_seed(cfg: TeacherConfig, step: int) -> int:
    """The torch seed of one step: mmdet's proposal samplers draw from torch's global RNG, so
    each step reseeds it from (seed, step) and a resumed run samples as an unbroken one."""
    return (cfg.seed * 1_000_003 + step) % (2**63)


def train_steps(model: torch.nn.Module, cfg: TeacherConfig, work: Path, show: bool, stop_after: int | None = None) -> dict:
    """The resumable loop (train/world.py's ``run_loop``): AdamW with warmup and cosine decay,
    gradients clipped; ``stop_after`` ends this run after that many steps (a planned kill)."""
    from iosd.pipeline.teacher import _quiet
    from iosd.train.world import Checkpointed, run_loop

    classes = teacher_classes()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    parts: dict[str, float] = {}

    def step_fn(step: int) -> float:
        torch.manual_seed(_step_seed(cfg, step))
        batch = training_batch(cfg, classes, step)
        with _quiet():
            data = model.data_preprocessor(batch, True)
            losses = model(**data, mode="loss")
            loss, log_vars = model.parse_losses(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        parts.update({k: round(float(torch.as_tensor(v).detach()), 4) for k, v in log_vars.items() if k != "loss"})
        return float(loss.detach())

    summary = run_loop("teacher", cfg.steps, Checkpointed(work, "teacher", {"model": model}, opt), step_fn, cfg, show, cfg.lr, stop_after)
    if summary.get("stopped"):
        return summary
    model.eval()
    return {**summary, "last_step_losses": parts}


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 copies of the floating tensors (half the bytes; loaded back into float32)."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def save_teacher(model: torch.nn.Module, config, out: Path, record: dict) -> dict:
    """The shipped directory: config.py, weights.pth (float16, with the class names in
    ``meta.dataset_meta.classes`` where the mmdet teacher reads them) and teacher.json; built
    under a temp name, then renamed over ``out``."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.dump(str(tmp / CONFIG_FILE))
    checkpoint = {"meta": {"dataset_meta": {"classes": list(record["classes"])}}, "state_dict": _half(model.state_dict())}
    torch.save(checkpoint, tmp / WEIGHTS_FILE)
    for path in tmp.iterdir():
        share_like_output(path)
    record = {**record, "sha256": directory_digests(tmp, record=RECORD), "bytes": sum(p.stat().st_size for p in tmp.iterdir())}
    write_bytes_atomic(tmp / RECORD, (json.dumps(record, indent=2) + "\n").encode())
    replace_directory(tmp, out)
    return record


def train_teacher(cfg: TeacherConfig, out: Path, work: Path, show: bool = True, log=print, stop_after: int | None = None) -> dict:
    """Train (resuming from ``work``), then write the shipped directory; returns its record
    (or, for a run stopped by ``stop_after``, the step it stopped at with nothing shipped)."""
    import resource

    from iosd.pipeline.teacher import _require_mmdet
    from iosd.train.world import _commit

    _require_mmdet()
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    identity = work / "config.json"
    if identity.exists() and json.loads(identity.read_text()) != asdict(cfg):
        raise UserError(f"{work} holds a teacher run with other settings", "pass --work elsewhere or remove it to start over")
    write_bytes_atomic(identity, json.dumps(asdict(cfg), indent=2).encode())
    classes = teacher_classes()
    config = model_config(cfg, classes)
    model = build_model(config, cfg.seed)
    log(f"teacher: Mask R-CNN, ResNet-18 x{cfg.width} / FPN {cfg.fpn}, {sum(p.numel() for p in model.parameters()):,} parameters, scenes at {WORLD_SIDE} px upscaled to {cfg.side}")
    summary = train_steps(model, cfg, work, show, stop_after)
    wall, peak = _add_run(work, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if summary.get("stopped"):
        return summary
    record = {
        "script": "scripts/train-teacher.py",
        "commit": _commit(),
        "base_config": BASE_CONFIG,
        "config": asdict(cfg),
        "classes": classes,
        "world_side": WORLD_SIDE,
        "training": summary,
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16",
        "torch": torch.__version__,
        "mmdet": _version("mmdet"),
        "mmcv": _version("mmcv"),
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
        "wall_seconds_all_runs": wall,  # a resumed run's earlier runs included (to the last stop)
        "peak_rss_gb": peak,  # the largest of those runs' peaks, not only this (perhaps save-only) run's
    }
    return save_teacher(model, config, out, record)


def _add_run(work: Path, seconds: float, peak_gb: float) -> tuple[float, float]:
    """Training wall seconds summed, and peak RSS (GB) maximised, over every run in ``work``
    that ended by itself (finished or --stop-after); a run killed from outside adds nothing."""
    path = work / "wall.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    total = round(before.get("seconds", 0.0) + seconds, 1)
    peak = round(max(before.get("peak_rss_gb", 0.0), peak_gb), 2)
    write_bytes_atomic(path, json.dumps({"seconds": total, "peak_rss_gb": peak}).encode())
    return total, peak


def _version(module: str) -> str:
    import importlib

    return importlib.import_module(module).__version__
