"""Sources of images and their features: the diffusion model itself, or a world of images
with exact masks (the built-in shapes world, or a user's own labelled images: ``coco:PATH``,
``folder:PATH``, read by ``iosd.pipeline.real_images``) passed through the UNet once,
re-noised to ``feature_t``. "Source" and "teacher" are the generator's two seams.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from iosd.errors import UserError
from iosd.featstore import STORED_DTYPES, StoredFeatures
from iosd.pipeline.capture import FeatureCapture
from iosd.pipeline.models import LoadedModel, decode_images, encode_images
from iosd.quantize import quantize_tensor

SOURCES = ("diffusion", "shapes", "coco", "folder")
LABELLED_SOURCES = ("coco", "folder")  # a user's own images, given as "<kind>:<path>"


def source_kind(source: str) -> str:
    """The kind of a --source value: "coco:instances.json" -> "coco"."""
    return source.partition(":")[0]


@dataclass
class Produced:
    """One batch out of a source: images, captured features (B, C, H, W) and, for worlds with
    known geometry, exact masks (one (N, H, W) bool array per image)."""

    images: np.ndarray
    features: dict[str, torch.Tensor]
    exact_masks: list[np.ndarray] | None = None
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # per-channel, once quantised (int8, fp8)

    def store(self, dtype: str) -> None:
        """Quantise the features to ``dtype`` where they are (the device), then move that
        stored form and its scales to the host."""
        stored = {p: quantize_tensor(t, dtype) for p, t in self.features.items()}
        self.features = {p: q.to("cpu") for p, (q, _) in stored.items()}
        self.scales = {p: s.to("cpu") for p, (_, s) in stored.items() if s is not None}

    def sample_features(self, b: int, stored: str | None) -> dict[str, np.ndarray] | StoredFeatures:
        """Image ``b``'s features: raw arrays (``stored`` None) or, once quantised to the
        ``stored`` dtype, that stored form for ``encode_features``."""
        if stored is None:
            return {p: t[b].numpy() for p, t in self.features.items()}
        arrays = {p: t[b].numpy().view(STORED_DTYPES[stored]) for p, t in self.features.items()}
        return StoredFeatures(stored, arrays, {p: s[b].numpy() for p, s in self.scales.items()})


def _noise(seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)


def _guided(loaded: LoadedModel, guidance: float) -> bool:
    """Whether the pipeline runs classifier-free guidance at ``guidance`` (as diffusers decides)."""
    return guidance > 1.0 and getattr(loaded.pipe.unet.config, "time_cond_proj_dim", None) is None


@torch.no_grad()
def renoised_pass(loaded: LoadedModel, capture: FeatureCapture, latents: torch.Tensor, prompts: list[str], seeds: list[int], t: int, size: int) -> dict[str, torch.Tensor]:
    """One UNet call on ``latents`` noised to timestep ``t`` (DDPM forward process), captured.

    With ``capture.halves == "both"`` the call is a guidance batch (the empty prompt's
    conditioning first, as the pipeline builds it), so both halves exist to be captured."""
    alphas = loaded.pipe.scheduler.alphas_cumprod.to(loaded.device)
    a = alphas[t].to(latents.dtype)
    noise = _noise([s + 1 for s in seeds], tuple(latents.shape[1:]), loaded.device, latents.dtype)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    guided = capture.halves == "both"
    if guided:
        noisy = torch.cat([noisy, noisy])
    timestep = torch.full((noisy.shape[0],), t, device=loaded.device, dtype=torch.long)
    conditioning = loaded.spec.conditioning(loaded.pipe, prompts, device=loaded.device, size=size, guided=guided)
    capture.keep, capture.guided, capture.armed = slice(None), guided, True
    try:
        loaded.pipe.unet(noisy, timestep, **conditioning)
    finally:
        capture.armed = False
    return capture.take()


@torch.no_grad()
def diffuse(loaded: LoadedModel, capture: FeatureCapture, prompts: list[str], seeds: list[int], *, steps: int, size: int, guidance: float, feature_step: int, feature_t: int | None, daam=None) -> Produced:
    """Generate images with the loaded pipeline (SDXL or SD); capture features at denoising
    call ``feature_step`` (negative counts from the end) or, with ``feature_t``, in an extra
    pass on the final latent. Under guidance (``guidance`` > 1) the capture keeps what
    ``capture.halves`` says (GD: ``halves="both"``, ``feature_step=-1``). A DAAM recorder, if
    given, sees the denoising calls only."""
    unet = loaded.pipe.unet
    target = feature_step % steps
    calls = {"n": 0}
    cfg = _guided(loaded, guidance)
    if capture.halves == "both" and not cfg and feature_t is None:
        raise UserError(f"capturing both guidance halves needs classifier-free guidance, but guidance is {guidance}", "pass guidance > 1 (GD: 5) or halves cond")

    def arm(_module, _args):
        capture.armed = feature_t is None and calls["n"] == target
        capture.keep, capture.guided = slice(None), cfg
        calls["n"] += 1

    handle = unet.register_forward_pre_hook(arm)
    try:
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = loaded.pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=gens, output_type="latent")
    finally:
        handle.remove()
        capture.armed = False
    latents = out.images
    if feature_t is None:
        features = capture.take()
    else:
        if daam is not None:
            daam.armed = False
        try:
            features = renoised_pass(loaded, capture, latents, prompts, seeds, feature_t, size)
        finally:
            if daam is not None:
                daam.armed = True
    return Produced(decode_images(loaded, latents), features)


@torch.no_grad()
def shapes_world(loaded: LoadedModel, capture: FeatureCapture, prompts: list[str], names: list[list[str]], seeds: list[int], *, size: int, feature_t: int) -> Produced:
    """Render the procedural shapes world (exact masks), then one re-noised UNet pass on it.

    A trained world's model draws each object in a random hue (its ``palette``) and paints the
    scene in its ``style``, as the world it learned: there, colour never names a class."""
    from iosd.pipeline.shapes import render_scene
    from iosd.worlds import random_hues

    world = loaded.info.get("world")
    images, masks = [], []
    for classes, seed in zip(names, seeds, strict=True):
        rng = np.random.default_rng(seed)
        hues = random_hues(np.random.default_rng([seed, 7]), len(classes)) if world and world["palette"] == "random" else None
        image, mask = render_scene(classes, rng, size, hues, world["style"] if world else "textured")
        images.append(image)
        masks.append(mask)
    batch = np.stack(images)
    latents = encode_images(loaded, batch)
    features = renoised_pass(loaded, capture, latents, prompts, seeds, feature_t, size)
    return Produced(batch, features, masks)


@torch.no_grad()
def labelled_world(loaded: LoadedModel, capture: FeatureCapture, source, indices: list[int], prompts: list[str], seeds: list[int], *, size: int, feature_t: int) -> Produced:
    """A user's own images (``iosd.pipeline.real_images.LabelledImages``) with their annotated
    masks, resized to ``size``, then one re-noised UNet pass on them."""
    loaded_images = [source.load(i, size) for i in indices]
    batch = np.stack([image for image, _ in loaded_images])
    latents = encode_images(loaded, batch)
    features = renoised_pass(loaded, capture, latents, prompts, seeds, feature_t, size)
    return Produced(batch, features, [masks for _, masks in loaded_images])
