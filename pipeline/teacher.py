"""The Mask R-CNN teacher: MMDetection 3.x instance masks turned into one mask per prompt class.

The generate stage labels each generated image with a COCO-trained Mask R-CNN: for every class
in the prompt, a mask by the recipe's ground-truth rule (``GT_RULES``) and the best score.
mmdet is imported lazily, so importing this module never needs mmcv.

Checkpoints are unpickled with ``torch.load(weights_only=True)``; old model-zoo files that
pickle numpy scalars or mmengine's HistoryBuffer in their metadata get exactly those known-safe
globals allowed for that one call, nothing more and never process-wide.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch

from iosd.choices import GT_RULES
from iosd.classes import canonical
from iosd.errors import UserError
from iosd.manifest import sha256_file
from iosd.world_teachers import CONFIG_FILE as TRAINED_CONFIG
from iosd.world_teachers import TEACHERS as TRAINED_TEACHERS
from iosd.world_teachers import WEIGHTS_FILE as TRAINED_WEIGHTS
from iosd.world_teachers import trained_teacher_root, verify_teacher

# Swin-S Mask R-CNN, 3x multi-scale COCO schedule (box AP 48.2, mask AP 43.2): the strongest
# plain Mask R-CNN in mmdet's zoo. Its weights URL is read from swin/metafile.yml at run time.
DEFAULT_CONFIG = "mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco"
TINY_CONFIG = "mask-rcnn_r50_fpn_1x_coco"
TINY_SEED = 0
MMCV_FIX = "run `make mmcv` or scripts/install-mmcv.sh"
CONFIG_FIX = f"pass an mmdet model-zoo config name such as {DEFAULT_CONFIG}, a trained teacher ({', '.join(TRAINED_TEACHERS)}), or a path to a .py config"
UNKNOWN_CLASS_FIX = "use classes the detector knows (COCO names), pass --teacher-config/--teacher-checkpoint for a detector that has them, or --teacher sam3 (any class name)"

# Globals old checkpoints pickle in their metadata that only rebuild data (numpy scalars,
# arrays, dtypes; mmengine's log buffer); ``numpy.dtypes.*DType`` classes are checked apart.
SAFE_GLOBALS = frozenset(
    {
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "mmengine.logging.history_buffer.HistoryBuffer",
        "builtins.getattr",  # stood in for by _history_buffer_method, see there
    }
)
HISTORY_METHODS = ("min", "max", "current", "mean")


@dataclass
class TeacherLabel:
    """One requested class in one image: its mask by the ground-truth rule and the best score."""

    mask: np.ndarray
    score: float


def has_work(teacher, images: Sequence, classes: Sequence[Sequence[str]]) -> bool:
    """Every teacher's ``label`` starts here: one class list per image, every class refused in one
    line before any work if the teacher cannot label it; False when there are no images."""
    if len(images) != len(classes):
        raise ValueError(f"{len(images)} images but {len(classes)} class lists")
    teacher.check_classes([n for names in classes for n in names])
    return bool(len(images))


# -- mmdet, configs ------------------------------------------------------------------------------
def _require_mmdet() -> None:
    """mmdet needs mmcv built with its C++ ops; say how to get them instead of a traceback."""
    try:
        with warnings.catch_warnings():  # torch deprecations raised by mmcv/mmdet imports
            warnings.simplefilter("ignore")
            import mmcv.ops  # noqa: F401
            import mmdet  # noqa: F401
    except ImportError:
        raise UserError("mmcv with ops is not installed (needed by the Mask R-CNN teacher)", MMCV_FIX) from None
    except AssertionError as err:  # mmdet refuses an mmcv version it was not built for
        raise UserError(f"mmcv does not fit mmdet: {err}", MMCV_FIX) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mmengine/mmdet log and warn freely while building and running; keep the CLI output clean."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _configs_root() -> Path:
    import mmdet

    return Path(mmdet.__file__).parent / ".mim" / "configs"


def resolve_config(config: str) -> Path:
    """A path to a .py config, or a model-zoo name found offline in mmdet's packaged configs."""
    trained = trained_teacher_root(config)
    if trained is not None:  # a teacher trained by scripts/train-teacher.py: every file checked first
        verify_teacher(trained, config if config in TRAINED_TEACHERS else None)
        return trained / TRAINED_CONFIG
    path = Path(config).expanduser()
    if path.is_file():
        return path
    name = config.removeprefix("mmdet::").removesuffix(".py")
    root = _configs_root()
    hits = [root / f"{name}.py"] if "/" in name else sorted(root.rglob(f"{name}.py"))
    hits = [h for h in hits if h.is_file()]
    if not name or not hits:
        raise UserError(f"unknown teacher config {config!r}: no such file and no mmdet model-zoo config of that name", CONFIG_FIX)
    return hits[0]


def zoo_weights(config_path: Path) -> str | None:
    """The official checkpoint URL of a packaged config, from its folder's model-zoo metafile."""
    import yaml

    meta = config_path.parent / "metafile.yml"
    if not meta.is_file():
        return None
    models = (yaml.safe_load(meta.read_text()) or {}).get("Models") or []
    for model in models:
        if Path(str(model.get("Config", ""))).name == config_path.name and model.get("Weights"):
            return str(model["Weights"])
    return None


def _load_config(path: Path, label: str):
    """Read a config and check it predicts instance masks (a Mask R-CNN-style test_cfg)."""
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(str(path))
    except Exception as err:
        raise UserError(f"teacher config {label!r} cannot be read: {_brief(err)}", CONFIG_FIX) from None
    rcnn = cfg.get("model", {}).get("test_cfg", {}).get("rcnn")
    if not isinstance(rcnn, dict) or "mask_thr_binary" not in rcnn:
        raise UserError(f"teacher config {label!r} is not a Mask R-CNN instance-segmentation model (no model.test_cfg.rcnn.mask_thr_binary)", CONFIG_FIX)
    return cfg


def _tune_config(cfg, score_thr: float, mask_thr: float, tiny: bool) -> None:
    """Thresholds into the model's post-processing; no pretrained-backbone download at build."""
    cfg.model.test_cfg.rcnn.score_thr = score_thr
    cfg.model.test_cfg.rcnn.mask_thr_binary = mask_thr
    if "init_cfg" in cfg.model.get("backbone", {}):
        cfg.model.backbone.init_cfg = None
    cfg.model.pop("init_cfg", None)
    if tiny and "rpn" in cfg.model.test_cfg:  # random weights: few proposals keep CPU runs quick
        cfg.model.test_cfg.rpn.nms_pre = 200
        cfg.model.test_cfg.rpn.max_per_img = 50
        cfg.model.test_cfg.rcnn.max_per_img = cfg.model.get("roi_head", {}).get("bbox_head", {}).get("num_classes", 80)


def _test_pipeline(cfg, image_size: int | None):
    """The config's test pipeline fed from arrays, without ground-truth loading."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg

    steps = [copy.deepcopy(s) for s in get_test_pipeline_cfg(cfg) if "LoadAnnotations" not in str(s["type"])]
    if not steps or "LoadImage" not in str(steps[0]["type"]):
        raise UserError("the teacher config's test pipeline does not start by loading an image", CONFIG_FIX)
    steps[0] = {"type": "mmdet.LoadImageFromNDArray"}
    if image_size:
        for step in steps:
            if str(step["type"]).endswith("Resize"):
                step.update(scale=(image_size, image_size), keep_ratio=True)
    return Compose(steps)


# -- checkpoints -----------------------------------------------------------------------------------
def _brief(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def _download(url: str) -> Path:
    """Fetch a URL into torch's hub cache (where mmengine's load_url keeps checkpoints)."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return cached
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as err:
        raise UserError(f"teacher checkpoint {url} cannot be downloaded ({_brief(err)})", "pass --teacher-checkpoint PATH to a local copy of the weights") from None
    return cached


def _local_checkpoint(checkpoint: str) -> Path:
    from iosd.prechecks import check_teacher_checkpoint, is_url

    if is_url(checkpoint):
        return _download(checkpoint)
    return check_teacher_checkpoint(checkpoint)  # also checked before any model loads


def _history_buffer_method(obj: Any, name: str) -> Any:
    """Stands in for getattr while unpickling: HistoryBuffer pickles its statistics methods as
    getattr(HistoryBuffer, name); any other getattr in a checkpoint is refused."""
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in HISTORY_METHODS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({getattr(obj, '__qualname__', type(obj).__name__)}, {name!r}) in a checkpoint")


def _import_attr(name: str) -> Any:
    """The object a pickled global names; numpy 1 and 2 spell core/_core differently."""
    module, _, attr = name.rpartition(".")
    spellings = [module]
    if module.startswith(("numpy.core.", "numpy._core.")):
        rest = module.split(".", 2)[2]
        spellings += [f"numpy._core.{rest}", f"numpy.core.{rest}"]
    for spelling in spellings:
        with warnings.catch_warnings():  # numpy 2 warns on numpy.core
            warnings.simplefilter("ignore")
            try:
                return getattr(importlib.import_module(spelling), attr)
            except (ImportError, AttributeError):
                continue
    return None


def _safe_global(name: str) -> Any | None:
    """The object for a known-safe pickled global, or None for anything else."""
    if name == "builtins.getattr":
        return _history_buffer_method
    module, _, attr = name.rpartition(".")
    if module == "numpy.dtypes" and attr.endswith("DType"):
        obj = _import_attr(name)
        return obj if isinstance(obj, type) and issubclass(obj, np.dtype) else None
    return _import_attr(name) if name in SAFE_GLOBALS else None


def _unsupported_global(err: BaseException) -> str | None:
    """The global a weights-only load stopped at: one it may not import, or a type it may not build."""
    text = str(err)
    match = re.search(r"GLOBAL (\S+) was not an allowed global", text) or re.search(r"Can only build .* but got <class '([\w.]+)'>", text)
    if not match:
        return None
    name = match.group(1)
    return name if "." in name else f"builtins.{name}"  # torch's message drops "builtins."


def _unpickler_detail(err: BaseException) -> str:
    """The reason in torch's long weights-only message, without its boilerplate."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    parts = [p.strip() for p in text.split("\n\n") if p.strip() and not p.strip().startswith(("Weights only", "Check the doc"))]
    reason = match.group(1) if match else (parts[-1] if parts else text)
    return " ".join(reason.split(". Please use")[0].split())[:200]


def _allowing(allowed: list[tuple[Any, str]], label: str) -> contextlib.AbstractContextManager:
    """torch's scoped allowlist (torch>=2.5); the process-wide one is never touched."""
    if not allowed:
        return contextlib.nullcontext()
    if not hasattr(torch.serialization, "safe_globals"):
        raise UserError(f"teacher checkpoint {label} pickles numpy/mmengine metadata that this torch {torch.__version__} cannot allow safely", "upgrade torch to 2.5 or later")
    return torch.serialization.safe_globals(allowed)


def load_checkpoint_file(path: Path, label: str | None = None) -> dict:
    """``torch.load(weights_only=True)``, allowing the known-safe globals the file needs for this
    one call only; an unsafe one is refused, never executed."""
    label = label or str(path)
    allowed: list[tuple[Any, str]] = []
    while True:
        scope = _allowing(allowed, label)
        try:
            with scope:
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as err:
            name = _unsupported_global(err)
            obj = _safe_global(name) if name and name not in {n for _, n in allowed} else None
            if obj is None:
                raise UserError(
                    f"teacher checkpoint {label} cannot be unpickled as weights and known-safe metadata ({_unpickler_detail(err)}); refusing to load it",
                    "pass a checkpoint holding only weights and plain metadata, e.g. re-saved from a trusted copy as {'state_dict': model.state_dict()}",
                ) from None
            allowed.append((obj, name))
        except Exception as err:
            raise UserError(f"teacher checkpoint {label} is not a readable torch checkpoint ({_brief(err)})", "pass the .pth file of a Mask R-CNN checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"teacher checkpoint {label} holds no state dict", "pass the .pth file of a Mask R-CNN checkpoint")
    return checkpoint


def _apply_checkpoint(model: torch.nn.Module, checkpoint: dict, label: str) -> dict:
    """Load the weights (mmengine's 'module.' stripping); refuse a checkpoint that fits nothing."""
    state = checkpoint.get("state_dict", checkpoint)
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"teacher checkpoint {label} does not fit the teacher config: {_brief(err)}", "pass the --teacher-config the checkpoint was trained with") from None
    if len(result.missing_keys) == len(model.state_dict()):
        raise UserError(f"teacher checkpoint {label} has none of the teacher config's weights", "pass the --teacher-config the checkpoint was trained with")
    return {"missing_keys": len(result.missing_keys), "unexpected_keys": len(result.unexpected_keys)}


def _label_names(checkpoint: dict | None) -> tuple[list[str], str]:
    """Detector label names: the checkpoint's dataset_meta (mmdet 3) or CLASSES (mmdet 2), else COCO."""
    meta = (checkpoint or {}).get("meta") or {}
    dataset_meta = {str(k).lower(): v for k, v in (meta.get("dataset_meta") or {}).items()}
    classes = dataset_meta.get("classes") or meta.get("CLASSES")
    if classes:
        return [str(c) for c in classes], "checkpoint"
    from mmdet.datasets import CocoDataset

    return list(CocoDataset.METAINFO["classes"]), "coco-default"


def _num_classes(model: torch.nn.Module) -> int | None:
    head = getattr(getattr(model, "roi_head", None), "bbox_head", None)
    if isinstance(head, torch.nn.ModuleList):  # cascade heads
        head = head[-1]
    return getattr(head, "num_classes", None)


# -- the teacher ----------------------------------------------------------------------------------
# How a class's instances become its one mask: GT_RULES (iosd.choices).


def class_mask(masks: torch.Tensor, scores: torch.Tensor, rule: str) -> tuple[np.ndarray, float]:
    """One (H, W) bool mask and its score from a label's instances (N, H, W), (N,); N >= 1."""
    if rule == "top":
        best = int(torch.argmax(scores))  # first of the highest, as mmdet's sorted output
        return masks[best].bool().cpu().numpy(), float(scores[best])
    if rule == "union":
        return masks.bool().any(0).cpu().numpy(), float(scores.max())
    raise UserError(f"unknown ground-truth rule {rule!r}", f"use one of {', '.join(GT_RULES)}")


class MaskRCNNTeacher:
    """A built mmdet detector plus the label-name map that turns its instances into class masks."""

    def __init__(self, model: torch.nn.Module, pipeline, names: list[str], info: dict) -> None:
        self.model = model
        self.pipeline = pipeline
        self.names = names
        self.info = info
        self.score_thr = float(info["score_thr"])
        self.gt = info.get("gt", "top")
        self._labels: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            self._labels.setdefault(_key(name), []).append(i)

    def labels_for(self, name: str) -> list[int]:
        """Detector label indices for a class name, matched through the synonym map."""
        return self._labels.get(_key(name), [])

    def knows(self, name: str) -> bool:
        """Whether a detector label matches the class (the teacher seam's question)."""
        return bool(self.labels_for(name))

    def check_classes(self, names: Sequence[str]) -> None:
        """Refuse, before any work, class names no detector label matches."""
        unknown = [n for n in dict.fromkeys(names) if not self.labels_for(n)]
        if unknown:
            fix = UNKNOWN_CLASS_FIX
            if self.info.get("label_names") == "checkpoint":  # not COCO's: say which it has
                fix = f"this detector labels only {', '.join(self.names)}; {fix.replace('(COCO names)', '')}".replace("  ", " ")
            raise UserError(f"the teacher cannot label {', '.join(map(repr, unknown))}: its detector has no such label, even through synonyms", fix)

    def label(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]) -> list[list[TeacherLabel]]:
        """Per image, per requested class: its mask by the ground-truth rule and the best score."""
        if not has_work(self, images, classes):
            return []
        from mmengine.dataset import pseudo_collate

        data = pseudo_collate([self.pipeline({"img": _to_bgr(img), "img_id": i}) for i, img in enumerate(images)])
        with torch.no_grad(), _quiet():
            results = self.model.test_step(data)
        return [self._per_class(res.pred_instances, img.shape[:2], names) for res, img, names in zip(results, images, classes, strict=True)]

    def _per_class(self, inst, shape: tuple[int, int], names: Sequence[str]) -> list[TeacherLabel]:
        out = []
        for name in names:
            wanted = torch.tensor(self.labels_for(name), device=inst.labels.device)
            keep = torch.isin(inst.labels, wanted) & (inst.scores > self.score_thr)
            if not bool(keep.any()):
                out.append(TeacherLabel(np.zeros(shape, dtype=bool), 0.0))
                continue
            mask, score = class_mask(inst.masks[keep], inst.scores[keep], self.gt)
            if mask.shape != tuple(shape):
                raise RuntimeError(f"teacher mask {mask.shape} differs from image {tuple(shape)}")
            out.append(TeacherLabel(mask, score))
        return out

    def describe(self) -> dict:
        """What labelled the set, for the shard manifest."""
        return {**self.info, "num_labels": len(self.names)}


def _key(name: str) -> str:
    """Match key of a class or label name: the synonym map's spelling; "dining_table" == "dining table"."""
    return canonical(name.replace("_", " "))


def _to_bgr(image: np.ndarray) -> np.ndarray:
    """Images arrive RGB; mmdet's pipeline expects BGR like cv2.imread."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"teacher images must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., ::-1])


def _check_thresholds(score_thr: float, mask_thr: float) -> None:
    for flag, value in (("--score-thr", score_thr), ("--mask-thr", mask_thr)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} {value} is outside 0..1", f"pass {flag} between 0 and 1")


def _pick_checkpoint(config: str | None, checkpoint: str | None, tiny: bool, path: Path) -> str | None:
    """The named checkpoint, else the model zoo's for the config; none for the tiny teacher."""
    if checkpoint or tiny:
        return checkpoint
    if path.name == TRAINED_CONFIG and trained_teacher_root(path) is not None:
        return str(path.parent / TRAINED_WEIGHTS)  # a trained teacher's own weights, verified with it
    url = zoo_weights(path)
    if url is None:
        raise UserError(f"teacher config {config!r} has no model-zoo checkpoint", "pass --teacher-checkpoint PATH or URL")
    return url


def build_teacher(
    config: str | None = None,
    checkpoint: str | None = None,
    *,
    device: str = "cpu",
    score_thr: float | None = None,
    mask_thr: float = 0.5,
    tiny: bool = False,
    image_size: int | None = None,
    gt: str = "top",
) -> MaskRCNNTeacher:
    """Build the Mask R-CNN teacher.

    ``tiny``: mmdet's own r50 Mask R-CNN config with random weights (seeded, so deterministic),
    test images resized to ``image_size``; for CPU runs that exercise the real code path.
    Otherwise ``config`` (zoo name or .py path, default Swin-S 3x COCO) with ``checkpoint``
    (path or URL, default the zoo weights of the config).
    """
    if gt not in GT_RULES:
        raise UserError(f"unknown ground-truth rule {gt!r}", f"use one of {', '.join(GT_RULES)}")
    _require_mmdet()
    score_thr = (0.0 if tiny else 0.05) if score_thr is None else float(score_thr)
    _check_thresholds(score_thr, mask_thr)
    name = config or (TINY_CONFIG if tiny else DEFAULT_CONFIG)
    path = resolve_config(name)
    with _quiet():
        cfg = _load_config(path, name)
    source = _pick_checkpoint(name, checkpoint, tiny, path)
    local = _local_checkpoint(source) if source else None
    ckpt = load_checkpoint_file(local, source) if local else None
    names, names_from = _label_names(ckpt)
    with _quiet():
        _tune_config(cfg, score_thr, mask_thr, tiny)
        model, fit = _build_model(cfg, ckpt, source)
        pipeline = _test_pipeline(cfg, image_size if tiny else None)
    del ckpt  # the weights now live in the model
    expected = _num_classes(model)
    if expected is not None and expected != len(names):
        raise UserError(f"teacher checkpoint {source} names {len(names)} labels but the config predicts {expected}", "pass the --teacher-config the checkpoint was trained with")
    model.to(device).eval()
    info = {
        "kind": "mmdet-mask-rcnn",
        "config": name,
        "config_path": str(path),
        "checkpoint": source,
        "checkpoint_sha256": sha256_file(local) if local else None,
        "score_thr": score_thr,
        "mask_thr": float(mask_thr),
        "gt": gt,
        "label_names": names_from,
        "device": str(device),
        "random_weights": source is None,
        "test_resize": image_size if tiny else None,
        "mmdet_version": _mmdet_version(),
        **fit,
    }
    return MaskRCNNTeacher(model, pipeline, names, info)


def _mmdet_version() -> str:
    import mmdet

    return mmdet.__version__


def _build_model(cfg, ckpt: dict | None, label: str | None) -> tuple[torch.nn.Module, dict]:
    """Build under mmdet's registry scope with a fixed seed (random weights are reproducible and
    the caller's RNG stream is untouched), then load the checkpoint's weights if any."""
    from mmdet.registry import MODELS
    from mmengine.model.utils import revert_sync_batchnorm
    from mmengine.registry import init_default_scope

    init_default_scope(cfg.get("default_scope", "mmdet") or "mmdet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        try:
            model = MODELS.build(cfg.model)
        except Exception as err:
            raise UserError(f"teacher model cannot be built from its config: {_brief(err)}", CONFIG_FIX) from None
    model = revert_sync_batchnorm(model)
    if ckpt is None:
        return model, _uniform_classifier(model)
    return model, _apply_checkpoint(model, ckpt, str(label))


def _uniform_classifier(model: torch.nn.Module) -> dict:
    """Random weights, but every label equally likely: a random classifier favours a few labels
    and leaves most prompt classes without masks (the tiny test_cfg keeps one box per label)."""
    head = getattr(getattr(model, "roi_head", None), "bbox_head", None)
    fc_cls = getattr(head, "fc_cls", None)
    if not isinstance(fc_cls, torch.nn.Linear):
        return {}
    with torch.no_grad():
        fc_cls.weight.zero_()
        fc_cls.bias.zero_()
    return {"uniform_classifier": True}
