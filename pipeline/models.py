"""Load the diffusion model: a hub id or local directory (SDXL-Turbo by default) or ``tiny``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iosd.errors import UserError

DEFAULT_MODEL = "stabilityai/sdxl-turbo"
TINY = "tiny"
TINY_MODEL_SEED = 0  # the tiny model's identity: gen, train and predict must see the same weights


@dataclass
class LoadedModel:
    pipe: object
    device: torch.device
    dtype: torch.dtype
    info: dict  # recorded in the manifest: id, revision, dtype, resolved path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but CUDA is not available", "use --device cpu or a GPU machine")
    return torch.device(device)


def load_model(model: str, *, device: str = "auto", revision: str | None = None) -> LoadedModel:
    """The SDXL pipeline, fp16 UNet/text encoders on CUDA with an fp32 VAE (it overflows in fp16)."""
    dev = pick_device(device)
    if model == TINY:
        from iosd.pipeline.tiny import tiny_pipeline

        pipe = tiny_pipeline(TINY_MODEL_SEED).to(dev)
        return LoadedModel(pipe, dev, torch.float32, {"id": TINY, "revision": f"seed{TINY_MODEL_SEED}", "dtype": "float32", "random_weights": True})
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    pipe = _from_pretrained(model, revision, dtype)
    pipe.to(dev)
    pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolved = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", model)
    return LoadedModel(pipe, dev, dtype, {"id": model, "revision": revision or _snapshot_revision(str(resolved)), "dtype": str(dtype).removeprefix("torch."), "random_weights": False})


def _snapshot_revision(path: str) -> str | None:
    """The commit hash of a hub snapshot directory (…/snapshots/<sha>), when that is what loaded."""
    parts = Path(path).parts
    return parts[-1] if len(parts) > 1 and parts[-2] == "snapshots" else None


def _from_pretrained(model: str, revision: str | None, dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise UserError(f"model {model!r} is neither a local directory nor a hub id (owner/name)", f"pass --model {DEFAULT_MODEL}, a local directory, or --model tiny")
    source = str(local) if local.exists() else model
    variant = "fp16" if dtype == torch.float16 else None
    try:
        try:
            return StableDiffusionXLPipeline.from_pretrained(source, dtype=dtype, variant=variant, revision=revision)
        except (ValueError, OSError) as err:
            if variant is None or "variant" not in str(err).lower():
                raise
            return StableDiffusionXLPipeline.from_pretrained(source, dtype=dtype, revision=revision)
    except OSError as err:
        if local.exists():
            raise UserError(f"{local} is not a diffusers SDXL directory ({str(err).splitlines()[0]})", "point --model at a directory with model_index.json") from None
        raise UserError(
            f"cannot load {model!r}: the Hugging Face Hub is unreachable from here and no cached copy exists",
            f"run `huggingface-cli download {model} --local-dir DIR` where the hub is reachable, then --model DIR (or --model tiny)",
        ) from None


def decode_images(loaded: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (B, H, W, 3) uint8 through the fp32 VAE."""
    vae = loaded.pipe.vae
    with torch.no_grad():
        x = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_images(loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> latents (distribution mean, scaled), for image sources."""
    vae = loaded.pipe.vae
    x = torch.from_numpy(np.array(images, copy=True)).to(loaded.device).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return lat.to(loaded.dtype)
