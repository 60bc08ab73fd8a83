"""Segment named classes in a generated (or given) image with a trained head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from iosd.errors import UserError
from iosd.manifest import write_json_atomic


@torch.no_grad()
def predict(run: Path, prompt: str | None, names: list[str], *, out: Path, image: Path | None, seed: int, threshold: float, device: str, load_image: Callable) -> dict:
    """Writes image.png, mask-<class>.png per class, overlay.png and prediction.json to ``out``."""
    from PIL import Image

    from iosd.evaluate.report import safe_name
    from iosd.pipeline.capture import FeatureCapture
    from iosd.pipeline.generate import IMAGE_SOURCE_T, default_prompt, load_configured
    from iosd.pipeline.models import encode_images
    from iosd.pipeline.sources import diffuse, renoised_pass
    from iosd.pipeline.text import QuerySpec, class_embeddings
    from iosd.prechecks import check_generation
    from iosd.train.checkpoint import load_head
    from iosd.viz import overlay, save_png_atomic

    out = Path(out)
    try:  # before any diffusion: a bad --out costs nothing
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror})", "choose a writable directory") from None
    head, info = load_head(run, "cpu")
    gen = info.get("generation") or {}
    if not gen:
        raise UserError(f"{run} does not record the model its shards came from", "retrain with this iosd")
    check_generation(gen, teacher=False)  # iosd-predict runs no teacher
    loaded = load_configured(gen, device)
    head = head.to(loaded.device)
    size = int(gen["resolution"])
    layers = tuple(p for p, _ in info["layout"]["layers"])
    query = QuerySpec.from_record(info["embedding"])
    if prompt is None:
        prompt = default_prompt(gen, names)
    with FeatureCapture(loaded.pipe.unet, layers, halves=gen.get("halves") or "cond") as capture:
        if image is not None:
            pixels = load_image(image, size)[None]
            t = gen.get("feature_t") if gen.get("feature_t") is not None else IMAGE_SOURCE_T
            feats = renoised_pass(loaded, capture, encode_images(loaded, pixels), [prompt], [seed], int(t), size)
        else:
            produced = diffuse(loaded, capture, [prompt], [seed], steps=int(gen["steps"]), size=size, guidance=float(gen["guidance"]), feature_step=int(gen["feature_step"]), feature_t=gen.get("feature_t"))
            pixels, feats = produced.images, produced.features
    queries = torch.from_numpy(class_embeddings(loaded.pipe, names, query))[None].to(loaded.device)
    feats = {p: t.to(loaded.device, torch.float32) for p, t in feats.items()}
    logits = head(feats, queries, torch.ones(1, len(names), dtype=torch.bool, device=loaded.device)).float()
    probs = torch.sigmoid(F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False))[0].cpu().numpy()
    masks = probs > threshold
    files = {"image": str(save_png_atomic(Image.fromarray(pixels[0]), out / "image.png"))}
    for name, mask in zip(names, masks, strict=True):
        files[f"mask:{name}"] = str(save_png_atomic(Image.fromarray((mask * 255).astype(np.uint8)), out / f"mask-{safe_name(name)}.png"))
    files["overlay"] = str(save_png_atomic(Image.fromarray(overlay(pixels[0], masks, names)), out / "overlay.png"))
    result = {"prompt": prompt, "classes": names, "pixels": {n: int(m.sum()) for n, m in zip(names, masks, strict=True)}, "model": gen["model"], "checkpoint": str(run), "files": files}
    write_json_atomic(out / "prediction.json", result)
    return result
