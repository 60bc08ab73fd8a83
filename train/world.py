"""Train a world generator: a small latent diffusion model of the real diffusers classes,
taught the shapes world from captions that name every class.

Three stages, each resumable from its own checkpoint in the work directory:
1. scenes: ``scenes`` shapes-world images at ``WORLD_SIDE`` px with captions (one or two
   objects, every class of the world, random hues that the caption may name, size and position
   words), deterministic from the seed;
2. the VAE (``AutoencoderKL``) learns to reconstruct them; its ``scaling_factor`` is then set
   so latents have unit variance, as SDXL's 0.13025 does for its VAE;
3. the UNet (``UNet2DConditionModel``, the family's block layout) and the text encoders learn
   together to denoise those latents (epsilon prediction, min-SNR weighting, an EMA of the
   weights is what ships), with 10% empty captions for classifier-free guidance.

The tokenizer is the real CLIP BPE, so a class name is the tokens it would be; the text
encoders start from the family's random ones and learn the world's words (``denoiser``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from iosd.classes import load_split
from iosd.errors import UserError
from iosd.manifest import replace_directory, share_like_output, write_bytes_atomic
from iosd.pipeline.models import quiet_libraries
from iosd.recipes import get_recipe, recipe_names
from iosd.worlds import (
    NOISE_SCHEDULES,
    PROVENANCE,
    TEXT_MODES,
    WORLD_SIDE,
    WORLDS,
    directory_digests,
    random_colours,
)

if TYPE_CHECKING:
    from iosd.train.world_teacher import TeacherConfig

UNCONDITIONAL_RATE = 0.1  # captions dropped for classifier-free guidance
EXTRA_TEMPLATES = (("{}", "{} and {}"), ("a picture of a {}", "a picture of a {} next to a {}"))
SIZE_WORDS = (0.08, 0.2)  # visible fraction of the image below / above which "small" / "large" fits
POSITION_RATE, COLOUR_RATE, SIZE_RATE = 0.3, 0.5, 0.3
MIN_SNR_GAMMA = 5.0
# The tiny VAE's layout (4x down, 16 latent channels) with its first level narrower: its 64 px
# convolutions dominate a training step, and 4x4x3 pixels into 16 channels is easy to learn.
LATENT_DOWN = 4  # the world VAE's pixels per latent cell
VAE_CROP = 32  # the VAE trains on crops: convolutional, it learns the same code at a quarter of the cost
WORLD_VAE = {"block_out_channels": [16, 32, 64], "norm_num_groups": 8}
EMA_DECAY = 0.999


@dataclass
class WorldConfig:
    """One world's training run; everything that changes the weights is here (and recorded)."""

    world: str = "world-sdxl"
    seed: int = 0
    scenes: int = 16000
    vae_steps: int = 500
    unet_steps: int = 4000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    warmup: int = 100
    exclude: list[str] = field(default_factory=list)  # classes never drawn nor named (the blind control)
    save_every: int = 250
    grounding: float = 0.1  # weight of the token grounding loss (train/grounding.py); 0: captions alone
    text: str = "joint"  # "joint": encoders trained with the UNet (world v1); "clip": pretrained contrastively, then frozen (as SD's); "frozen": left at their random init
    text_steps: int = 1500
    text_batch: int = 128
    text_lr: float = 1e-3
    unet_width: int = 1  # the family's tiny UNet with every channel and head count times this
    style: str = "textured"  # how the scenes are painted (pipeline/shapes.py SCENE_STYLES)
    vae_kl: float = 1e-6  # weight of the VAE's KL term: larger gives smoother latents to model
    latent_channels: int = 16  # the VAE's latent width (SDXL's is 4; the random tiny VAE's 16)
    schedule: str = "sd"  # the denoiser's noise schedule (iosd/worlds.py NOISE_SCHEDULES)

    def __post_init__(self) -> None:
        if self.text not in TEXT_MODES:
            raise UserError(f"unknown --text {self.text!r}", f"use one of {', '.join(TEXT_MODES)}")
        check_unet_width(self.unet_width)
        from iosd.pipeline.shapes import SCENE_STYLES

        if self.style not in SCENE_STYLES:
            raise UserError(f"unknown --style {self.style!r}", f"use one of {', '.join(SCENE_STYLES)}")
        if self.schedule not in NOISE_SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}", f"use one of {', '.join(NOISE_SCHEDULES)}")
        if self.latent_channels < 1:
            raise UserError(f"--latent-channels {self.latent_channels} is not positive", "pass 4 (SDXL's) or 16 (the tiny VAE's)")
        if self.vae_kl < 0:
            raise UserError(f"--vae-kl {self.vae_kl} is negative", "pass 0 or a positive weight such as 1e-6")

    @property
    def family(self) -> str:
        if self.world not in WORLDS:
            raise UserError(f"unknown world {self.world!r}", f"use one of {', '.join(WORLDS)}")
        return WORLDS[self.world]["family"]


def world_classes(exclude: list[str]) -> list[str]:
    """Every class of the shapes world (seen and unseen alike), less ``exclude``."""
    names = list(load_split("shapes", 1).all)
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise UserError(f"--exclude names no shapes class: {', '.join(unknown)}", f"choose from {', '.join(names)}")
    return [n for n in names if n not in exclude]


def caption_templates() -> list[tuple[str, str]]:
    """(one-object, two-object) templates: every recipe's own, so their prompts are in the
    world's language, and two plain ones."""
    pairs = []
    for name in recipe_names():
        gen = get_recipe(name).settings["gen"]
        pair = (gen["template"]["value"], gen["template2"]["value"])
        if pair not in pairs:
            pairs.append(pair)
    return pairs + list(EXTRA_TEMPLATES)


def draw_objects(rng: np.random.Generator, classes: list[str], side: int = WORLD_SIDE, style: str = "textured") -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The world's scenes, uncaptioned: one or two objects of any of ``classes`` in random hues,
    painted in ``style``; image, masks, names and colour words. The world generator's scenes and
    its teacher's (train/world_teacher.py) are both drawn here, so the two see the same world."""
    from iosd.pipeline.shapes import render_scene

    count = 1 if rng.random() < 0.5 else 2
    names = [str(n) for n in rng.choice(classes, size=count, replace=False)]
    colours, hues = zip(*random_colours(rng, count), strict=True)
    image, masks = render_scene(names, rng, side, list(hues), style)
    return image, masks, names, list(colours)


def sample_scene(rng: np.random.Generator, classes: list[str], templates: list[tuple[str, str]], side: int = WORLD_SIDE, style: str = "textured") -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """One training scene: image, masks, caption and the classes it shows."""
    image, masks, names, colours = draw_objects(rng, classes, side, style)
    count = len(names)
    descriptions = []
    centres = [np.argwhere(m)[:, 1].mean() if m.any() else side / 2 for m in masks]
    for i, (name, colour, mask) in enumerate(zip(names, colours, masks, strict=True)):
        words = []
        area = mask.mean()
        if rng.random() < SIZE_RATE and (area < SIZE_WORDS[0] or area > SIZE_WORDS[1]):
            words.append("small" if area < SIZE_WORDS[0] else "large")
        if rng.random() < COLOUR_RATE:
            words.append(colour)
        text = " ".join([*words, name])
        if count == 2 and rng.random() < POSITION_RATE:
            text += " on the left" if centres[i] < centres[1 - i] else " on the right"
        descriptions.append(text)
    one, two = templates[int(rng.integers(len(templates)))]
    caption = (one if count == 1 else two).format(*descriptions)
    return image, masks, caption, names


@dataclass
class Scenes:
    """The training scenes, from the seed: images (uint8, N x side x side x 3), captions ("" for
    the unconditional ones), and each scene's class names with their masks at the latent side."""

    images: np.ndarray
    captions: list[str]
    names: list[list[str]]
    masks: list[np.ndarray]  # float16 (objects, side/4, side/4): the visible fraction of each latent cell


def build_scenes(cfg: WorldConfig) -> Scenes:
    rng = np.random.default_rng([cfg.seed, 1])
    classes, templates = world_classes(cfg.exclude), caption_templates()
    images = np.empty((cfg.scenes, WORLD_SIDE, WORLD_SIDE, 3), np.uint8)
    captions, names, masks = [], [], []
    cell = WORLD_SIDE // LATENT_DOWN
    for i in range(cfg.scenes):
        image, scene_masks, caption, scene_names = sample_scene(rng, classes, templates, style=cfg.style)
        images[i] = image
        kept = rng.random() >= UNCONDITIONAL_RATE
        captions.append(caption if kept else "")
        names.append(scene_names if kept else [])
        pooled = scene_masks.reshape(len(scene_masks), cell, LATENT_DOWN, cell, LATENT_DOWN).mean(axis=(2, 4))
        masks.append(pooled.astype(np.float16))
    return Scenes(images, captions, names, masks)


# ---------------------------------------------------------------------------------------
# Models: the family's tiny pipeline (real classes, real BPE), at the world's side.
# ---------------------------------------------------------------------------------------
def check_unet_width(width: int) -> None:
    if width < 1:
        raise UserError(f"--unet-width {width} is not a positive multiple", "pass 1 (the shipped world's UNet), 2, ...")


def unet_config(family: str, width: int = 1, latent_channels: int = 16) -> dict:
    """The world UNet: the family's tiny layout at the world's latent side and ``latent_channels``
    in and out, its channels and heads times ``width`` (the head size stays; 1 is the shipped world's)."""
    from iosd.pipeline.tiny import TINY_SD1_UNET_CONFIG, TINY_UNET_CONFIG

    check_unet_width(width)
    base = TINY_UNET_CONFIG if family == "sdxl" else TINY_SD1_UNET_CONFIG
    heads = base["attention_head_dim"]
    return {**base, "sample_size": WORLD_SIDE // LATENT_DOWN, "in_channels": latent_channels, "out_channels": latent_channels, "block_out_channels": [c * width for c in base["block_out_channels"]],
            "attention_head_dim": [h * width for h in heads] if isinstance(heads, list) else heads * width}


def base_pipeline(family: str, seed: int, unet_width: int = 1, latent_channels: int = 16, schedule: str = "sd"):
    """The family's embedded pipeline with a fresh VAE and UNet sized for the world, and its
    scheduler under the world's noise schedule."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from iosd.pipeline.tiny import TINY_VAE_CONFIG, tiny_pipeline, tiny_sd1_pipeline

    pipe = (tiny_pipeline if family == "sdxl" else tiny_sd1_pipeline)(seed)
    torch.manual_seed(seed + 10)
    pipe.vae = AutoencoderKL(**{**TINY_VAE_CONFIG, **WORLD_VAE, "sample_size": WORLD_SIDE, "latent_channels": latent_channels})
    torch.manual_seed(seed + 11)
    pipe.unet = UNet2DConditionModel(**unet_config(family, unet_width, latent_channels))
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **NOISE_SCHEDULES[schedule])
    pipe.register_modules(vae=pipe.vae, unet=pipe.unet, scheduler=pipe.scheduler)
    return pipe


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------
# One resumable loop for both stages.
# ---------------------------------------------------------------------------------------
class Checkpointed:
    """Model, optimizer (and EMA) state saved atomically every ``save_every`` steps under
    ``work/<stage>``; a rerun continues from the last save, with the same batches after it
    (each step's data and noise are drawn from (seed, step) alone)."""

    def __init__(self, work: Path, stage: str, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.dir, self.modules, self.optimizer = work / stage, modules, optimizer

    def load(self) -> int:
        state = self.dir / "state.json"
        if not state.exists():
            return 0
        meta = json.loads(state.read_text())
        for name, module in self.modules.items():
            module.load_state_dict(load_file(self.dir / f"{name}.safetensors"))
        opt = torch.load(self.dir / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(opt)
        return int(meta["step"])

    def save(self, step: int, extra: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            tmp = self.dir / f".{name}.tmp"
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp))
            os.replace(tmp, self.dir / f"{name}.safetensors")
        tmp = self.dir / ".optimizer.tmp"
        torch.save(self.optimizer.state_dict(), tmp)
        os.replace(tmp, self.dir / "optimizer.pt")
        write_bytes_atomic(self.dir / "state.json", json.dumps({"step": step, **extra}).encode())  # last: the save is whole


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def run_loop(stage: str, steps: int, ckpt: Checkpointed, step_fn, cfg: WorldConfig | TeacherConfig, show: bool, lr: float, stop_after: int | None = None) -> dict:
    """``step_fn(step) -> loss`` for steps not yet done, saving as it goes; returns the stage's
    summary. ``stop_after`` ends this run, saved, after that step (a planned kill: rerun
    without it to continue); its summary says ``stopped``."""
    from iosd.train.runlog import Progress

    start = ckpt.load()
    state_file = ckpt.dir / "state.json"
    losses: list[float] = json.loads(state_file.read_text()).get("recent", []) if start else []
    end = steps if stop_after is None else min(steps, stop_after)
    progress = Progress(show, steps, start, stage)
    t0, done_here = time.perf_counter(), 0
    try:
        for step in range(start, end):
            for group in ckpt.optimizer.param_groups:
                group["lr"] = _lr(step, steps, lr, cfg.warmup)
            loss = step_fn(step)
            losses = (losses + [loss])[-100:]
            done_here += 1
            rate = done_here * cfg.batch_size / (time.perf_counter() - t0)
            progress.advance(step + 1, loss=f"{np.mean(losses):.4f}", speed=f"{rate:.0f}")
            if (step + 1) % cfg.save_every == 0 or step + 1 == end:
                ckpt.save(step + 1, {"recent": losses})
    finally:
        progress.close()
    if end < steps:
        return {"steps": max(start, end), "stopped": True}
    return {"steps": steps, "final_loss": round(float(np.mean(losses)), 5) if losses else None}


# ---------------------------------------------------------------------------------------
# The stages.
# ---------------------------------------------------------------------------------------
def train_vae(vae, images: np.ndarray, cfg: WorldConfig, work: Path, show: bool) -> dict:
    """Reconstruction (L1 + MSE) with a small KL term, as latent-diffusion autoencoders are
    trained, on ``VAE_CROP`` px crops."""
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 2, step])
        y, x = rng.integers(0, WORLD_SIDE - VAE_CROP + 1, 2)
        x = _to_unit(images[rng.integers(0, len(images), cfg.batch_size), y : y + VAE_CROP, x : x + VAE_CROP])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + cfg.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    summary = run_loop("vae", cfg.vae_steps, Checkpointed(work, "vae", {"vae": vae}, opt), step_fn, cfg, show, cfg.vae_lr)
    vae.eval()
    return summary


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, chunk: int = 256) -> torch.Tensor:
    """Every scene's latent (the posterior mean, unscaled)."""
    return torch.cat([vae.encode(_to_unit(images[i : i + chunk])).latent_dist.mean for i in range(0, len(images), chunk)])


def _replace_rows(cond: dict, uncond: dict, rows: list[int]) -> None:
    """Put the unconditional first row of ``uncond`` into ``cond``'s ``rows``, key by key."""
    for key, value in cond.items():
        if isinstance(value, dict):
            _replace_rows(value, uncond[key], rows)
        elif rows:
            value[rows] = uncond[key][0]


def conditioning(pipe, family, captions: list[str]) -> dict:
    """The UNet's conditioning for ``captions`` as the pipeline computes it (with gradients to
    the text encoders); "" is the unconditional row the pipeline uses under guidance (zeros for
    SDXL, the empty prompt's embedding for SD)."""
    device = torch.device("cpu")
    cond = family.conditioning(pipe, captions, device=device, size=WORLD_SIDE)
    empty = [j for j, c in enumerate(captions) if not c]
    if empty:
        _replace_rows(cond, family.conditioning(pipe, captions[:1], device=device, size=WORLD_SIDE, guided=True), empty)
    return cond


def train_text(pipe, family, scenes: Scenes, cfg: WorldConfig, work: Path, show: bool) -> dict:
    """CLIP's contrastive loss between the family's text encoders and a small image tower
    (train/contrastive.py) on the captioned scenes; the tower is thrown away after."""
    from iosd.train import contrastive

    encoders = family.text_encoders(pipe)
    torch.manual_seed(cfg.seed + 12)
    tower = contrastive.ImageTower([contrastive.text_width(e) for _, e in encoders])
    model = torch.nn.ModuleDict({"tower": tower, **{attr: getattr(pipe, attr) for _, attr in family.encoders}}).train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.text_lr, weight_decay=0.1)
    captioned = np.flatnonzero([bool(c) for c in scenes.captions])
    classes = world_classes(cfg.exclude)

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 4, step])
        index = rng.choice(captioned, size=min(cfg.text_batch, len(captioned)), replace=False)
        images = tower(_to_unit(scenes.images[index]))
        captions = [scenes.captions[i] for i in index]
        hard = [contrastive.swapped_caption(rng, scenes.captions[i], scenes.names[i], classes) for i in index]
        loss = sum(contrastive.clip_loss(image, contrastive.pooled_text(tok, enc, captions), tower.logit_scale[k], contrastive.pooled_text(tok, enc, hard))
                   for k, (image, (tok, enc)) in enumerate(zip(images, encoders, strict=True))) / len(encoders)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    summary = run_loop("text", cfg.text_steps, Checkpointed(work, "text", {"model": model}, opt), step_fn, cfg, show, cfg.text_lr)
    model.eval().requires_grad_(False)
    return summary


def denoiser(pipe, family, text: str) -> torch.nn.ModuleDict:
    """What learns in the last stage: the UNet, and with ``text="joint"`` the text encoders
    too (world v1). Measured (docs/cpu-world.md): frozen *at random* without token grounding,
    the UNet ignored the caption after 2000 steps (noise prediction with the right class names,
    wrong ones or none differed by 0.01%), and with it ("frozen") the names stay apart but the
    samples are no more recognisable; trained with the UNet, the names matter within 1000 steps
    but collapse onto one axis; pretrained contrastively ("clip") they collapse less."""
    modules = {"unet": pipe.unet}
    if text == "joint":
        modules |= {attr: getattr(pipe, attr) for _, attr in family.encoders}
    return torch.nn.ModuleDict(modules)


def name_spans(tokenizer, scenes: Scenes) -> list[list[tuple[int, int]]]:
    """Each scene's class names as token spans of its caption (the first tokenizer's positions,
    which SDXL's second shares)."""
    from iosd.pipeline.text import find_token_span

    return [[find_token_span(tokenizer, caption, name) for name in names] for caption, names in zip(scenes.captions, scenes.names, strict=True)]


def train_denoiser(pipe, family, latents: torch.Tensor, scenes: Scenes, cfg: WorldConfig, work: Path, show: bool) -> dict:
    """Epsilon prediction over uniform timesteps, min-SNR-weighted, plus ``cfg.grounding`` times
    the token grounding loss (train/grounding.py); an EMA of the weights ships."""
    from iosd.train import grounding

    captions = scenes.captions
    model = denoiser(pipe, family, cfg.text).train().requires_grad_(True)
    frozen_text = contextlib.nullcontext() if cfg.text == "joint" else torch.no_grad()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    v_prediction = pipe.scheduler.config.prediction_type == "v_prediction"
    # min-SNR-gamma (Hang et al. 2023) in the target's own terms: epsilon / SNR, v / (SNR + 1)
    weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / (snr + 1 if v_prediction else snr)
    spans = name_spans(pipe.tokenizer, scenes) if cfg.grounding else None
    token_losses: list[float] = []

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([cfg.seed, 3, step])
        index = rng.integers(0, len(latents), cfg.batch_size)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        x0 = latents[torch.from_numpy(index)]
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if store is not None:
            store.clear()
        with frozen_text:
            cond = conditioning(pipe, family, [captions[i] for i in index])
        pred = pipe.unet(noisy, t, **cond).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_prediction else noise
        loss = (weight[t] * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        if store is not None:
            grounded = grounding.token_loss(store, [spans[i] for i in index], [torch.from_numpy(scenes.masks[i]).float() for i in index])
            token_losses.append(float(grounded.detach()))
            loss = loss + cfg.grounding * grounded
            store.clear()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        return float(loss.detach())

    ckpt = Checkpointed(work, "denoiser", {"model": model, "ema": ema}, opt)
    with grounding.recording(pipe.unet) if cfg.grounding else contextlib.nullcontext() as store:
        summary = run_loop("denoiser", cfg.unet_steps, ckpt, step_fn, cfg, show, cfg.unet_lr)
    if token_losses:
        summary["final_token_loss"] = round(float(np.mean(token_losses[-100:])), 5)
    model.load_state_dict(ema.state_dict())
    model.eval().requires_grad_(False)
    return summary


def name_summary(pipe, names: list[str]) -> dict:
    """How far apart the trained text conditioning keeps the class names (train/name_geometry.py):
    names on one axis cannot be told apart by the generator, nor by any head."""
    from iosd.train.name_geometry import name_geometry

    geometry = name_geometry(pipe, names)
    return {k: geometry[k] for k in ("template", "variance_in_top_components", "closest_pairs", "pairs_above_0.9", "pairs")}


def _commit() -> str | None:
    """HEAD's hash, with "+dirty" when the training code differs from it (the record must not
    claim a commit that did not produce the weights). The shipped weights (iosd/data) are its
    output, not its code."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "train", "iosd", "pipeline", "scripts", ":(exclude)iosd/data"], capture_output=True, text=True, cwd=here.parent, timeout=10).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def save_world(pipe, out: Path, record: dict) -> dict:
    """Write the pipeline as a diffusers directory (float16 weights: half the bytes, loaded as
    float32 on the CPU) and its provenance record; built under a temp name, then renamed."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_libraries():
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        pipe.to(torch.float32)
    for path in tmp.rglob("*"):
        if path.is_file():
            share_like_output(path)  # safetensors writes 0o600
    record = {**record, "sha256": directory_digests(tmp)}
    (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    replace_directory(tmp, out)
    return record


def train_world(cfg: WorldConfig, out: Path, work: Path, show: bool = True, log=print) -> dict:
    """All three stages, then the shipped directory; returns the provenance record."""
    from iosd.pipeline.families import get_family

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    family = get_family(cfg.family)
    work.mkdir(parents=True, exist_ok=True)
    identity = work / "config.json"
    if identity.exists() and json.loads(identity.read_text()) != asdict(cfg):
        raise UserError(f"{work} holds a run with other settings", "pass --work elsewhere or remove it to start over")
    write_bytes_atomic(identity, json.dumps(asdict(cfg), indent=2).encode())
    pipe = base_pipeline(family.name, cfg.seed, cfg.unet_width, cfg.latent_channels, cfg.schedule)
    log(f"scenes: {cfg.scenes} at {WORLD_SIDE} px, classes {', '.join(world_classes(cfg.exclude))}")
    scenes = build_scenes(cfg)
    vae_summary = train_vae(pipe.vae, scenes.images, cfg, work, show)
    latents = encode_latents(pipe.vae, scenes.images)
    scale = float(1 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    log(f"vae: loss {vae_summary['final_loss']}, latent scaling factor {scale:.4f}")
    text_summary = None
    if cfg.text == "clip":
        text_summary = train_text(pipe, family, scenes, cfg, work, show)
        geometry = name_summary(pipe, world_classes([]))
        log(f"text: loss {text_summary['final_loss']}, class names {geometry['variance_in_top_components'][0]:.1%} of their variance in one direction")
    unet_summary = train_denoiser(pipe, family, latents, scenes, cfg, work, show)
    log(f"unet: loss {unet_summary['final_loss']}")
    names = name_summary(pipe, world_classes([]))  # the excluded ones too: the blind world never learned them
    log(f"class names: {names['variance_in_top_components'][0]:.1%} of their variance in one direction, closest {names['closest_pairs'][0]}")
    record = {
        "world": cfg.world,
        "family": family.name,
        "script": "scripts/train-world.py",
        "commit": _commit(),
        "config": asdict(cfg),
        "side": WORLD_SIDE,
        "palette": "random",
        "style": cfg.style,
        "classes": world_classes(cfg.exclude),
        "vae": vae_summary,
        "text": text_summary,
        "unet": unet_summary,
        "names": names,
        "vae_scaling_factor": scale,
        "torch": torch.__version__,
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    return save_world(pipe, out, record)
