"""Load the diffusion model: a hub id or local directory of an SDXL-class or SD 1.x/2.x
pipeline (SDXL-Turbo by default), or an embedded random-weight stand-in (``tiny``: SDXL,
``tiny-sd1``: SD 1.x). The family is read from the pipeline's class (model_index.json)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iosd.errors import UserError
from iosd.pipeline.families import (
    Family,
    family_of_class,
    family_of_pipe,
    get_family,
    supported_hint,
)
from iosd.worlds import WORLDS, verify_world, world_dir

DEFAULT_MODEL = "stabilityai/sdxl-turbo"
TINY = "tiny"  # random-weight SDXL (pipeline/tiny.py)
TINY_SD1 = "tiny-sd1"  # random-weight SD 1.x (pipeline/tiny.py)
TINY_MODELS = (TINY, TINY_SD1)
RANDOM_WEIGHTS_MARKER = "random-weights.json"  # in a directory of a real architecture with random weights (scripts/build-real-model.py)
TINY_MODEL_SEED = 0  # the tiny model's identity: gen, train and predict must see the same weights
STAND_INS = (*TINY_MODELS, *WORLDS)  # CPU models by name: random tiny ones and the trained worlds


@dataclass
class LoadedModel:
    pipe: object
    device: torch.device
    dtype: torch.dtype
    info: dict  # recorded in the manifest: id, revision, dtype, family, resolved path
    family: str = "sdxl"  # "sdxl" | "sd" (iosd.pipeline.families)

    @property
    def spec(self) -> Family:
        """The family object: pipeline class, text encoders, UNet conditioning, VAE scaling."""
        return get_family(self.family)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but CUDA is not available", "use --device cpu or a GPU machine")
    return torch.device(device)


def load_model(model: str, *, device: str = "auto", revision: str | None = None) -> LoadedModel:
    """The pipeline of ``model`` (SDXL-class or SD 1.x/2.x), fp16 UNet/text encoders on CUDA
    with an fp32 VAE (SDXL's overflows in fp16); ``info["family"]`` says which family."""
    dev = pick_device(device)
    if model in TINY_MODELS:
        from iosd.pipeline.tiny import tiny_pipeline, tiny_sd1_pipeline

        pipe = (tiny_pipeline if model == TINY else tiny_sd1_pipeline)(TINY_MODEL_SEED).to(dev)
        family = family_of_pipe(pipe)
        info = {"id": model, "revision": f"seed{TINY_MODEL_SEED}", "dtype": "float32", "family": family.name, "random_weights": True}
        return LoadedModel(pipe, dev, torch.float32, info, family.name)
    if model in WORLDS:
        return _load_world(model, dev)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    family, source, local = _family_of(model, revision)
    pipe = _from_pretrained(family, model, source, local, revision, dtype)
    with quiet_libraries():  # diffusers warns that the VAE "should be kept in float32": it is
        pipe.to(dev)
        pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    resolved = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path", model)
    info = {"id": model, "revision": revision or _snapshot_revision(str(resolved)), "dtype": str(dtype).removeprefix("torch."), "family": family.name,
            "random_weights": local is not None and (Path(local) / RANDOM_WEIGHTS_MARKER).exists()}
    return LoadedModel(pipe, dev, dtype, info, family.name)


def _load_world(name: str, dev: torch.device) -> LoadedModel:
    """A trained world (iosd/worlds.py), every file checked against its provenance record
    first, loaded in float32 (its weights are stored in float16)."""
    record = verify_world(name)
    root = world_dir(name)
    family, _, _ = _family_of(str(root), None)
    pipe = _from_pretrained(family, name, str(root), root, None, torch.float32)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    world = {"name": name, "palette": record["palette"], "style": record.get("style", "textured"), "side": record["side"], "seed": record["config"]["seed"]}
    info = {"id": name, "revision": record["sha256"]["unet/diffusion_pytorch_model.safetensors"][:12], "dtype": "float32", "family": family.name,
            "random_weights": False, "world": world}
    return LoadedModel(pipe, dev, torch.float32, info, family.name)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While loading, diffusers' and transformers' bars (``Loading pipeline components...``) and
    warnings (modules "kept in float32") say nothing an iosd user acts on: silenced unless
    ``--verbose`` (iosd.verbosity). The hub's download bars stay: the one sign of life of a
    multi-GB download. Settings are restored afterwards."""
    from iosd.verbosity import is_verbose

    if is_verbose():
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    hub_bars = not are_progress_bars_disabled()
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()  # transformers' also turns the hub's off: back on below
    if hub_bars:
        enable_progress_bars()
    try:
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()
        if not hub_bars:
            disable_progress_bars()


def _snapshot_revision(path: str) -> str | None:
    """The commit hash of a hub snapshot directory (…/snapshots/<sha>), when that is what loaded."""
    parts = Path(path).parts
    return parts[-1] if len(parts) > 1 and parts[-2] == "snapshots" else None


def _unreachable(model: str) -> UserError:
    return UserError(
        f"cannot load {model!r}: the Hugging Face Hub is unreachable from here and no cached copy exists",
        f"run `huggingface-cli download {model} --local-dir DIR` where the hub is reachable, then --model DIR (or --model {TINY} / {TINY_SD1})",
    )


def _family_of(model: str, revision: str | None) -> tuple[Family, str, Path | None]:
    """(family, source to load, local directory or None) from the pipeline's model_index.json."""
    local = Path(model).expanduser()
    if local.exists():
        index = local / "model_index.json"
        if not local.is_dir() or not index.is_file():
            raise UserError(f"{local} is not a diffusers pipeline directory (no model_index.json)", "point --model at a directory saved with save_pretrained (or a hub snapshot)")
        try:
            config = json.loads(index.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{index} is not readable JSON ({err})", "re-save the pipeline with save_pretrained") from None
        source = str(local)
    else:
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            raise UserError(f"model {model!r} is neither a local directory nor a hub id (owner/name)", f"pass --model {DEFAULT_MODEL}, a local directory, or --model {TINY} / {TINY_SD1}")
        from diffusers import DiffusionPipeline

        try:
            config = DiffusionPipeline.load_config(model, revision=revision)
        except OSError:
            raise _unreachable(model) from None
        source, local = model, None
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    family = family_of_class(str(class_name))
    if family is None:
        raise UserError(f"{model} is a {class_name or 'unnamed'} pipeline, not one iosd can drive", supported_hint())
    return family, source, local


def _from_pretrained(family: Family, model: str, source: str, local: Path | None, revision: str | None, dtype: torch.dtype):
    cls = family.pipeline_class()
    variant = "fp16" if dtype == torch.float16 else None
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    try:
        with quiet_libraries():
            try:
                return cls.from_pretrained(source, dtype=dtype, variant=variant, revision=revision, **extra)
            except (ValueError, OSError) as err:
                if variant is None or "variant" not in str(err).lower():
                    raise
                return cls.from_pretrained(source, dtype=dtype, revision=revision, **extra)
    except OSError as err:
        if local is not None:
            raise UserError(f"{local} is not a loadable diffusers {cls.__name__} directory ({str(err).splitlines()[0]})", "point --model at a directory with model_index.json and its components") from None
        raise _unreachable(model) from None


def decode_images(loaded: LoadedModel, latents: torch.Tensor) -> np.ndarray:
    """Latents -> (B, H, W, 3) uint8 through the fp32 VAE."""
    vae = loaded.pipe.vae
    with torch.no_grad():
        x = vae.decode(loaded.spec.latents_to_vae(latents.to(torch.float32), vae)).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def encode_images(loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> latents (distribution mean, scaled), for image sources."""
    vae = loaded.pipe.vae
    x = torch.from_numpy(np.array(images, copy=True)).to(loaded.device).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = loaded.spec.vae_to_latents(vae.encode(x).latent_dist.mean, vae)
    return lat.to(loaded.dtype)
