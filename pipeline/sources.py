"""Sources of images and their features: the diffusion model itself, or a world of images
with exact masks (the built-in shapes world; a user's own images later) passed through the
UNet once, re-noised to ``feature_t``. "Source" and "teacher" are the generator's two seams.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from iosd.pipeline.capture import FeatureCapture
from iosd.pipeline.models import LoadedModel, decode_images, encode_images

SOURCES = ("diffusion", "shapes")


@dataclass
class Produced:
    """One batch out of a source: images, captured features (B, C, H, W) and, for worlds with
    known geometry, exact masks (one (N, H, W) bool array per image)."""

    images: np.ndarray
    features: dict[str, torch.Tensor]
    exact_masks: list[np.ndarray] | None = None


def _noise(seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)


def _conditioning(loaded: LoadedModel, prompts: list[str], size: int) -> dict:
    embeds, _, pooled, _ = loaded.pipe.encode_prompt(prompt=prompts, device=loaded.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=loaded.device, dtype=embeds.dtype).repeat(len(prompts), 1)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


@torch.no_grad()
def renoised_pass(loaded: LoadedModel, capture: FeatureCapture, latents: torch.Tensor, prompts: list[str], seeds: list[int], t: int, size: int) -> dict[str, torch.Tensor]:
    """One UNet call on ``latents`` noised to timestep ``t`` (DDPM forward process), captured."""
    alphas = loaded.pipe.scheduler.alphas_cumprod.to(loaded.device)
    a = alphas[t].to(latents.dtype)
    noise = _noise([s + 1 for s in seeds], tuple(latents.shape[1:]), loaded.device, latents.dtype)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    timestep = torch.full((len(prompts),), t, device=loaded.device, dtype=torch.long)
    capture.keep, capture.armed = slice(None), True
    try:
        loaded.pipe.unet(noisy, timestep, **_conditioning(loaded, prompts, size))
    finally:
        capture.armed = False
    return capture.take()


@torch.no_grad()
def diffuse(loaded: LoadedModel, capture: FeatureCapture, prompts: list[str], seeds: list[int], *, steps: int, size: int, guidance: float, feature_step: int, feature_t: int | None, daam=None) -> Produced:
    """Generate images with the SDXL pipeline; capture features at denoising call ``feature_step``
    (negative counts from the end) or, with ``feature_t``, in an extra pass on the final latent.
    A DAAM recorder, if given, sees the denoising calls only."""
    unet = loaded.pipe.unet
    target = feature_step % steps
    calls = {"n": 0}
    cfg = guidance > 1.0

    def arm(_module, _args):
        capture.armed = feature_t is None and calls["n"] == target
        capture.keep = slice(len(prompts), None) if cfg else slice(None)  # conditional half
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
    """Render the procedural shapes world (exact masks), then one re-noised UNet pass on it."""
    from iosd.pipeline.shapes import render_scene

    images, masks = [], []
    for classes, seed in zip(names, seeds, strict=True):
        image, mask = render_scene(classes, np.random.default_rng(seed), size)
        images.append(image)
        masks.append(mask)
    batch = np.stack(images)
    latents = encode_images(loaded, batch)
    features = renoised_pass(loaded, capture, latents, prompts, seeds, feature_t, size)
    return Produced(batch, features, masks)
