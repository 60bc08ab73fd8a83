#!/usr/bin/env python
"""Train a world generator on the shapes world and write it where ``--model <world>`` finds it.

    python scripts/train-world.py --world world-sdxl        # the shipped SDXL-class world
    python scripts/train-world.py --world world-sd1         # the shipped SD 1.x-class world
    python scripts/train-world.py --world world-sdxl --exclude star,heart,hexagon --out worlds/blind

Deterministic from --seed; killed and rerun with the same arguments, it resumes from the last
checkpoint in --work (every stage saves every --save-every steps). See iosd/worlds.py and
train/world.py; docs/cpu-world.md.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

from iosd.errors import user_errors
from iosd.pipeline.shapes import SCENE_STYLES
from iosd.worlds import NOISE_SCHEDULES, TEXT_MODES, WORLDS, world_dir


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--world", type=click.Choice(list(WORLDS)), default="world-sdxl")
@click.option("--seed", type=int, default=0)
@click.option("--scenes", type=int, default=16000, help="training scenes (one or two objects, captioned)")
@click.option("--vae-steps", type=int, default=500)
@click.option("--unet-steps", type=int, default=4000)
@click.option("--batch-size", type=int, default=32)
@click.option("--exclude", default="", help="comma-separated classes never drawn nor named (the blind control)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: iosd/data/worlds/<world>, where --model <world> loads it]")
@click.option("--work", type=click.Path(path_type=Path), default=None, help="checkpoints for resuming [default: runs/train-world/<out name>-seed<seed>]")
@click.option("--grounding", type=float, default=0.1, help="weight of the token grounding loss (train/grounding.py); 0 trains on captions alone")
@click.option("--text", "text_mode", type=click.Choice(TEXT_MODES), default="joint", help="joint: text encoders trained with the UNet (the shipped world); clip: pretrained contrastively on the scenes (NegCLIP hard negatives), then frozen, as SD's CLIP (docs/cpu-world.md: measured, not better here); frozen: left at their random init, so the names stay apart")
@click.option("--text-steps", type=int, default=1500, help="contrastive steps of the text encoders (--text clip)")
@click.option("--unet-width", type=int, default=1, help="the UNet's channels and heads times this (1: the shipped world's, 2.6 M parameters)")
@click.option("--style", type=click.Choice(list(SCENE_STYLES)), default="textured", help="how scenes are painted: textured objects on clutter, or flat ones on a smooth field")
@click.option("--vae-kl", type=float, default=1e-6, help="weight of the VAE's KL term")
@click.option("--latent-channels", type=int, default=16, help="the VAE's latent width")
@click.option("--schedule", type=click.Choice(list(NOISE_SCHEDULES)), default="sd", help="the denoiser's noise schedule: SD's scaled-linear betas, DDPM's linear ones, or SD's rescaled to zero terminal SNR with v-prediction (iosd/worlds.py NOISE_SCHEDULES)")
@click.option("--save-every", type=int, default=250)
@click.option("--threads", type=int, default=None, help="torch threads [default: torch's]")
@click.option("--quiet", is_flag=True)
@user_errors(kept="checkpoints are kept")
def main(world, seed, scenes, vae_steps, unet_steps, batch_size, exclude, out, work, grounding, text_mode, text_steps, unet_width, style, vae_kl, latent_channels, schedule, save_every, threads, quiet):
    import torch

    from iosd.train.world import WorldConfig, train_world

    if threads:
        torch.set_num_threads(threads)
    cfg = WorldConfig(world=world, seed=seed, scenes=scenes, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size,
                      exclude=[c.strip() for c in exclude.split(",") if c.strip()], save_every=save_every, grounding=grounding,
                      text=text_mode, text_steps=text_steps, unet_width=unet_width, style=style, vae_kl=vae_kl, latent_channels=latent_channels, schedule=schedule)
    out = out or world_dir(world)
    work = work or Path("runs/train-world") / f"{out.name}-seed{seed}"
    started = time.perf_counter()
    record = train_world(cfg, out, work, show=not quiet, log=(lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr)))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"world": world, "out": str(out), "seed": seed, "vae_loss": record["vae"]["final_loss"], "unet_loss": record["unet"]["final_loss"],
                      "wall_seconds": round(time.perf_counter() - started, 1), "peak_rss_gb": round(peak_gb, 2), "bytes": size}))


if __name__ == "__main__":
    main()
