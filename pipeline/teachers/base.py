"""What every teacher is, and the shared machinery of the text-prompted ones.

``Teacher``: images (uint8 HxWx3 RGB, one size per batch) and per image the class names ->
per class a ``TeacherLabel`` (one mask by the recipe's --gt rule, its best score). A
text-prompted teacher (``PromptedTeacher``) is asked with each class's name and its synonyms;
a subclass only turns (image, prompt) queries into scored instance masks, in one forward per
batch on the device, and the ground-truth rule and score threshold are applied here, the same
for every teacher.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from iosd.choices import GT_RULES
from iosd.errors import UserError
from iosd.pipeline.teacher import TeacherLabel, class_mask, has_work

__all__ = ["PromptedTeacher", "Query", "Teacher", "TeacherLabel", "images_tensor", "load_pretrained", "prepare_pixels"]


class Teacher(Protocol):
    """The interface the generate stage, iosd-eval and iosd-synth use."""

    def check_classes(self, names: Sequence[str]) -> None: ...

    def knows(self, name: str) -> bool: ...

    def label(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]) -> list[list[TeacherLabel]]: ...

    def describe(self) -> dict: ...


@dataclass(frozen=True)
class Query:
    """One prompt for one image: ``slot`` is the class's place in that image's class list."""

    image: int
    slot: int
    text: str


def images_tensor(images: Sequence[np.ndarray], teacher: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 of a batch, refused in one line unless every image is uint8 HxWx3 of one size."""
    shapes = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UserError(f"the {teacher} teacher takes uint8 HxWx3 RGB images, got {image.dtype} {image.shape}", "pass 8-bit RGB images")
        shapes.append(image.shape)
    if len(set(shapes)) > 1:
        sizes = sorted({f"{h}x{w}" for h, w, _ in shapes})
        raise UserError(f"the {teacher} teacher got one batch of images of mixed sizes ({', '.join(sizes)})", "resize the images to one size, or label each size in its own batch")
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()


def prepare_pixels(pixels: torch.Tensor, spec: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, tuple[int, int]]:
    """A uint8 batch as the model's processor would make it (resize, rescale, normalise, pad),
    on the device; and the (h, w) of the image inside the model's input (the rest is padding).

    Done in torch, batched, so the transformers image processors (which need torchvision) are
    never on the path. ``spec["resize"]``: "square" (SAM 3, SAM 2: to size x size),
    "longest-pad" (SAM: longest side to size, zero-padded), "pad-square" (OWLv2: padded to a
    square with grey, then resized), "shortest" (Grounding DINO: shortest side to size, longest
    at most 1333).
    """
    x = pixels.to(device=device, dtype=torch.float32) / 255.0
    h, w = x.shape[-2:]
    size = int(spec["image_size"])
    mode = spec["resize"]
    if mode == "pad-square":
        side = max(h, w)
        x = F.pad(x, (0, side - w, 0, side - h), value=0.5)
        h = w = side
    if mode in ("square", "pad-square"):
        out = (size, size)
    elif mode == "longest-pad":
        scale = size / max(h, w)
        out = (int(h * scale + 0.5), int(w * scale + 0.5))
    elif mode == "shortest":
        scale = min(size / min(h, w), 1333 / max(h, w))
        out = (int(h * scale + 0.5), int(w * scale + 0.5))
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    if tuple(x.shape[-2:]) != out:
        x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(spec["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    valid = out
    if mode == "longest-pad":
        x = F.pad(x, (0, size - out[1], 0, size - out[0]))
        valid = out
    elif mode == "pad-square":
        valid = (round(size * pixels.shape[-2] / h), round(size * pixels.shape[-1] / w))
    return x.to(dtype), valid


def masks_to_image(logits: torch.Tensor, frame: tuple[int, int], valid: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Mask logits (N, h, w) over the model's input ``frame`` -> (N, H, W) float logits over the
    image: upsampled to the frame, padding cropped, resized to the image (as post_process_masks)."""
    x = logits.float().unsqueeze(0)
    if tuple(x.shape[-2:]) != tuple(frame):
        x = F.interpolate(x, size=frame, mode="bilinear", align_corners=False)
    x = x[..., : valid[0], : valid[1]]
    if tuple(x.shape[-2:]) != tuple(shape):
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    return x[0]


def half_dtype(device: torch.device, half: bool) -> torch.dtype:
    """float16 on CUDA where the model runs safely in it, float32 elsewhere (CPU half is slow)."""
    return torch.float16 if half and device.type == "cuda" else torch.float32


def _brief(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


def check_model_files(location: str, *, tokenizer: bool, teacher: str) -> None:
    """A local model directory has its config, weights and (``tokenizer``) tokenizer files;
    offline (HF_HUB_OFFLINE), a hub id must be in the cache. One line before any work."""
    fix = f"download it first (huggingface-cli download {location} --local-dir DIR) and pass --teacher-model DIR"
    path = Path(location).expanduser()
    if path.is_dir() or location.startswith(("/", ".", "~")):
        if not path.is_dir():
            raise UserError(f"the {teacher} teacher's model directory {location} does not exist", "pass --teacher-model with an existing directory")
        names = {p.name for p in path.iterdir()}
        if "config.json" not in names:
            raise UserError(f"the {teacher} teacher's model directory {location} has no config.json", fix)
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            raise UserError(f"the {teacher} teacher's model directory {location} has no weights (*.safetensors or *.bin)", fix)
        if tokenizer and not names & {"tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json"}:
            raise UserError(f"the {teacher} teacher's model directory {location} has no tokenizer files (tokenizer.json, vocab.json or vocab.txt)", fix)
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(location, "config.json"), str):
            raise UserError(f"the {teacher} teacher's model {location} is not in the hub cache and the hub is offline (HF_HUB_OFFLINE)", fix)


def load_pretrained(cls: Any, location: str, revision: str | None, dtype: torch.dtype, teacher: str) -> Any:
    """``cls.from_pretrained`` with one line instead of a traceback when it cannot be had."""
    try:
        return cls.from_pretrained(location, revision=revision, dtype=dtype)
    except Exception as err:
        raise UserError(f"the {teacher} teacher's model {location} cannot be loaded ({_brief(err)})", f"check the id or directory, or download it first (huggingface-cli download {location})") from None


def load_tokenizer(location: str, revision: str | None, teacher: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, revision=revision)
    except Exception as err:
        raise UserError(f"the {teacher} teacher's tokenizer files in {location} cannot be loaded ({_brief(err)})", f"download the model with its processor files (huggingface-cli download {location})") from None


class PromptedTeacher:
    """A teacher asked with the class names: any vocabulary. Subclasses implement ``_instances``."""

    name = "prompted"

    def __init__(self, *, tokenizer: Any, max_tokens: int, score_thr: float, mask_thr: float, gt: str, device: str,
                 synonyms: dict[str, list[str]] | None, info: dict) -> None:
        if gt not in GT_RULES:
            raise UserError(f"unknown ground-truth rule {gt!r}", f"use one of {', '.join(GT_RULES)}")
        for flag, value in (("--score-thr", score_thr), ("--mask-thr", mask_thr)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} {value} is outside 0..1", f"pass {flag} between 0 and 1")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.score_thr = float(score_thr)
        self.mask_thr = float(mask_thr)
        self.gt = gt
        self.device = torch.device(device)
        self.synonyms = {k: [str(s) for s in v] for k, v in (synonyms or {}).items()}
        self.info = info

    # -- classes -------------------------------------------------------------------------
    def knows(self, name: str) -> bool:
        """Every class name with tokens: the prompt is the name itself."""
        return True

    def labels_for(self, name: str) -> list[int]:
        """Callers written against the mmdet teacher ask for label indices: one for any name."""
        return [0]

    def prompts(self, name: str) -> list[str]:
        """The texts a class is asked with: its name (underscores as spaces), then its synonyms."""
        return list(dict.fromkeys([name.replace("_", " ").strip(), *self.synonyms.get(name, [])]))

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_classes(self, names: Sequence[str]) -> None:
        """Refuse, before any work, a class whose prompt gives the teacher's tokenizer no
        tokens, or more than its text encoder takes."""
        for name in dict.fromkeys(names):
            for text in self.prompts(name):
                ids = self._tokens(text)
                if not ids or not any(ch.isalnum() for ch in text):
                    raise UserError(f"the {self.name} teacher cannot be prompted with class {name!r}: {text!r} has no tokens", "give each class a name with letters or digits")
                if len(ids) > self.max_tokens - 2:
                    raise UserError(f"the {self.name} teacher cannot be prompted with class {name!r}: {text!r} is {len(ids)} tokens, its text encoder takes {self.max_tokens - 2}", "shorten the class name or its synonyms")

    # -- labelling -----------------------------------------------------------------------
    def label(self, images: Sequence[np.ndarray], classes: Sequence[Sequence[str]]) -> list[list[TeacherLabel]]:
        """Per image, per requested class: its mask by the ground-truth rule and the best score."""
        if not has_work(self, images, classes):
            return []
        pixels = images_tensor(images, self.name)
        shape = (int(pixels.shape[-2]), int(pixels.shape[-1]))
        queries = [Query(i, j, text) for i, names in enumerate(classes) for j, name in enumerate(names) for text in self.prompts(name)]
        found: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if queries:
            with torch.inference_mode():
                results = self._instances(pixels, queries, shape)
            for query, result in zip(queries, results, strict=True):
                found.setdefault((query.image, query.slot), []).append(result)
        out = []
        for i, names in enumerate(classes):
            row = []
            for j in range(len(names)):
                parts = [(m, s) for m, s in found.get((i, j), []) if len(s)]
                if not parts:
                    row.append(TeacherLabel(np.zeros(shape, dtype=bool), 0.0))
                    continue
                masks = torch.cat([m for m, _ in parts])
                scores = torch.cat([s for _, s in parts]).float()
                mask, score = class_mask(masks, scores, self.gt)
                row.append(TeacherLabel(mask, score))
            out.append(row)
        return out

    def _instances(self, pixels: torch.Tensor, queries: list[Query], shape: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per query its instances above the score threshold: (N, H, W) bool masks, (N,) scores."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What labelled the set, for the shard manifest: name, models (id, revision), thresholds."""
        return {**self.info, "score_thr": self.score_thr, "mask_thr": self.mask_thr, "gt": self.gt, "device": str(self.device), "synonyms": self.synonyms}


def resolve_models(teacher: str, spec: dict, given: Sequence[str]) -> list[tuple[str, dict, str, str | None]]:
    """(role, model spec, id or directory, revision) per component of a teacher: teachers.json's,
    or --teacher-model's comma-separated ids/directories in the same order (revision then None)."""
    roles = list(spec["models"])
    if given and len(given) != len(roles):
        raise UserError(f"--teacher-model names {len(given)} models but the {teacher} teacher has {len(roles)} ({', '.join(roles)})", f"pass {len(roles)} comma-separated ids or directories, in the order {', '.join(roles)}")
    out = []
    for k, role in enumerate(roles):
        model = spec["models"][role]
        location = given[k] if given else model["id"]
        out.append((role, model, location, None if given else model.get("revision")))
    return out


def seeded(seed: int, build: Any) -> Any:
    """Random weights that are the same on every machine, without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


MAX_BOXES = 20  # boxes per (image, prompt) passed on to the box-prompted segmenter, best first


def top_boxes(scores: torch.Tensor, boxes: torch.Tensor, score_thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The boxes above the threshold, best first, at most MAX_BOXES: (N,), (N, 4)."""
    keep = scores > score_thr
    scores, boxes = scores[keep], boxes[keep]
    order = torch.argsort(scores, descending=True)[:MAX_BOXES]
    return scores[order], boxes[order]


def box_prompted_masks(segmenter: torch.nn.Module, x: torch.Tensor, valid: tuple[int, int], boxes: list[torch.Tensor], shape: tuple[int, int], mask_thr: float) -> list[torch.Tensor]:
    """Masks of a SAM-family model (SamModel, Sam2Model) for xyxy image-pixel boxes: per image
    (N, H, W) bool. One forward for the batch: each image's boxes padded to the longest list."""
    most = max((len(b) for b in boxes), default=0)
    if most == 0:
        return [torch.zeros((0, *shape), dtype=torch.bool) for _ in boxes]
    scale = torch.tensor([valid[1] / shape[1], valid[0] / shape[0]] * 2, device=x.device)
    padded = torch.zeros(len(boxes), most, 4, device=x.device)
    padded[..., 2:] = 1.0  # a 1-pixel box where an image has fewer boxes; its mask is dropped
    for i, b in enumerate(boxes):
        if len(b):
            padded[i, : len(b)] = b.to(x.device).float() * scale
    out = segmenter(pixel_values=x, input_boxes=padded.to(x.dtype), multimask_output=False)
    frame = tuple(x.shape[-2:])
    result = []
    for i, b in enumerate(boxes):
        if not len(b):
            result.append(torch.zeros((0, *shape), dtype=torch.bool))
            continue
        logits = out.pred_masks[i, : len(b), 0]
        result.append((masks_to_image(logits, frame, valid, shape) > mask_thr).cpu())
    return result


class BoxThenMaskTeacher(PromptedTeacher):
    """A text-prompted detector's boxes, then a box-prompted segmenter's masks: the detector
    half (``_boxes``) is each teacher's own; grouping the queries by image, one segmenter
    forward for every kept box of a batch and handing each query its masks are shared."""

    detector: torch.nn.Module
    segmenter: torch.nn.Module
    specs: dict[str, dict]

    def _boxes(self, pixels: torch.Tensor, per_image: list[list[int]], queries: list[Query], shape: tuple[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per query index: (scores, xyxy boxes in image pixels) of the instances it found."""
        raise NotImplementedError

    def _instances(self, pixels: torch.Tensor, queries: list[Query], shape: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_image: list[list[int]] = [[] for _ in range(pixels.shape[0])]  # query indices of each image
        for k, q in enumerate(queries):
            per_image[q.image].append(k)
        found = self._boxes(pixels, per_image, queries, shape)
        sx, valid = prepare_pixels(pixels, self.specs["segmenter"], self.device, next(self.segmenter.parameters()).dtype)
        image_boxes = [torch.cat([found[k][1] for k in ks]) if ks else torch.zeros(0, 4) for ks in per_image]
        masks = box_prompted_masks(self.segmenter, sx, valid, image_boxes, shape, self.mask_thr)
        results: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(queries)  # type: ignore[list-item]
        for i, ks in enumerate(per_image):
            start = 0
            for k in ks:
                scores, boxes = found[k]
                results[k] = (masks[i][start : start + len(boxes)], scores.cpu())
                start += len(boxes)
        return results


def build_parts(name: str, options: Any) -> tuple[list[tuple[str, dict, str, str | None]], torch.device, dict, dict[str, dict]]:
    """What every teacher's ``build`` starts from: its models (role, spec, id, revision) after
    --teacher-model, the device, its threshold defaults and a copy of each model's spec."""
    from iosd.pipeline.teachers import teacher_spec, threshold_defaults

    parts = resolve_models(name, teacher_spec(name), options.models)
    return parts, torch.device(options.device), threshold_defaults(name), {role: dict(model) for role, model, _, _ in parts}


def model_records(parts: list[tuple[str, dict, str, str | None]], tiny: bool) -> list[dict]:
    """The manifest's record of each model: id and revision, or the tiny config it was built from."""
    if tiny:
        return [{"role": role, "id": "tiny", "config": f"{model['class']} tiny (random weights)", "revision": None} for role, model, _, _ in parts]
    return [{"role": role, "id": ident, "revision": rev} for role, _, ident, rev in parts]


def common_options(name: str, options: Any, defaults: dict, parts: list, device: torch.device) -> dict:
    """The keyword arguments every prompted teacher takes from the options and its defaults."""
    info = {"kind": "text-prompted", "name": name, "models": model_records(parts, options.tiny), "dtype": "float32", "random_weights": options.tiny,
            "sources": {k: v["source"] for k, v in defaults.items()}}
    return {
        "score_thr": defaults["score_thr"]["value"] if options.score_thr is None else options.score_thr,
        "mask_thr": defaults["mask_thr"]["value"] if options.mask_thr is None else options.mask_thr,
        "gt": options.gt, "device": str(device), "synonyms": options.synonyms, "info": info,
    }
