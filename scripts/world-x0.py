#!/usr/bin/env python
"""How much of a scene a world's denoiser still reads at each noise level: the probe that
located where the worlds' blobs come from.

    python scripts/world-x0.py --model world-sdxl --out x0.png

The world's own scenes (its style, captioned as in training) are noised to each ``--timesteps``
value and the UNet's prediction of the clean latent is decoded; the grid shows the scenes, then
one row per timestep. The JSON says, per timestep, how well that prediction correlates with the
scene's latent. A world reads a scene it is shown well by t = 700 (correlation 0.8-0.9);
at the last timestep what is left comes from the caption alone (0.31 under a zero-SNR schedule,
where nothing of the scene remains): the first sampling steps, where only the caption says what
to draw, are where the worlds' blobs come from (docs/cpu-world.md). Predictions follow the
scheduler's ``prediction_type``.
"""

from __future__ import annotations

import json
import sys

import click

from iosd.errors import user_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--model", default="world-sdxl", help="a trained world (iosd/worlds.py)")
@click.option("--out", default="x0.png")
@click.option("--scenes", type=click.IntRange(min=1), default=8)
@click.option("--timesteps", default="400,700,900,999", help="comma-separated, in 0..999")
@click.option("--seed", type=int, default=5)
@user_errors(kept="nothing was written", rerun="then rerun the same command")
def main(model: str, out: str, scenes: int, timesteps: str, seed: int) -> None:
    import numpy as np
    import torch

    from iosd.errors import UserError
    from iosd.pipeline.families import get_family
    from iosd.pipeline.models import load_model
    from iosd.train.world import caption_templates, sample_scene, world_classes
    from iosd.viz import grid, save_png_atomic

    steps = [int(t) for t in timesteps.split(",") if t.strip()]
    if not steps or not all(0 <= t < 1000 for t in steps):
        raise UserError(f"--timesteps {timesteps} holds a value outside 0..999", "pass timesteps such as 400,700,900,999")
    loaded = load_model(model, device="cpu")
    world = loaded.info.get("world")
    if not world:
        raise UserError(f"{model} is not a trained world", "pass --model world-sdxl or world-sd1")
    pipe, family = loaded.pipe, get_family(loaded.family)
    rng = np.random.default_rng(seed)
    drawn = [sample_scene(rng, world_classes([]), caption_templates(), world["side"], world["style"]) for _ in range(scenes)]
    images = np.stack([d[0] for d in drawn])
    captions = [d[2] for d in drawn]
    scale = pipe.vae.config.scaling_factor
    alphas = pipe.scheduler.alphas_cumprod.float()
    v_prediction = pipe.scheduler.config.prediction_type == "v_prediction"
    rows, report = [images], {}
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = pipe.vae.encode(x).latent_dist.mean * scale
        cond = family.conditioning(pipe, captions, device=torch.device("cpu"), size=world["side"])
        gen = torch.Generator().manual_seed(seed)
        for t in steps:
            a = alphas[t]
            noisy = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
            pred = pipe.unet(noisy, torch.full((scenes,), t), **cond).sample
            x0 = a.sqrt() * noisy - (1 - a).sqrt() * pred if v_prediction else (noisy - (1 - a).sqrt() * pred) / a.sqrt().clamp(min=1e-4)
            centred = [v.flatten(1) - v.flatten(1).mean(1, keepdim=True) for v in (x0, z)]
            corr = torch.nn.functional.cosine_similarity(*centred, dim=1)
            report[str(t)] = {"snr": float(a / (1 - a)), "x0_correlation": round(float(corr.mean()), 4)}
            decoded = pipe.vae.decode(x0 / scale).sample.clamp(-1, 1)
            rows.append(((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    print(json.dumps({"model": model, "prediction_type": pipe.scheduler.config.prediction_type, "scenes": scenes, "timesteps": report}, indent=2))
    titles = ["scene"] * scenes + [f"x0 at t={t}" for t in steps for _ in range(scenes)]
    path = save_png_atomic(grid([tile for row in rows for tile in row], titles, ncols=scenes, tile=96), out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
