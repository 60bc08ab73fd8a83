"""The trained CPU world: small text-to-image models that iosd trains itself on the shapes world.

Random weights carry no class semantics, so on a CPU nothing else can show the papers'
mechanism (a head trained on seen classes segments unseen ones because the generator knows
them). ``scripts/train-world.py`` trains these models; they ship as diffusers directories under
``iosd/data/worlds/<name>/`` with a provenance record (``world.json``: script, commit, seed,
steps, final losses and the sha256 of every file), and ``--model <name>`` loads one after
checking every file against that record. This module is the one definition of their names,
where they live, what their world looks like and how they are verified.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from iosd.errors import UserError
from iosd.manifest import sha256_file

PROVENANCE = "world.json"  # in each world directory; not itself hashed
# Shipped with the package; IOSD_WORLDS_DIR points elsewhere (a retrained or blind world).
WORLDS_DIR = Path(os.environ.get("IOSD_WORLDS_DIR") or str(resources.files("iosd").joinpath("data/worlds")))
# name -> its model family and the recipe it runs by default
WORLDS: dict[str, dict] = {
    "world-sdxl": {"family": "sdxl", "recipe": "fast"},
    "world-sd1": {"family": "sd", "recipe": "gd"},
}
WORLD_SIDE = 64  # pixels: the side the world's models are trained at (16x16 latents)
# Colour words and their hues: every object's hue is drawn at random (and may be named in the
# caption), so colour never identifies a class; only what the generator learned does.
COLOURS: dict[str, float] = {"red": 0.0, "orange": 0.075, "yellow": 0.155, "green": 0.32, "cyan": 0.5, "blue": 0.63, "purple": 0.76, "pink": 0.9}
HUE_JITTER = 0.02

# The noise schedule the world's denoiser trains under and its sampler uses (beta settings of the
# diffusers scheduler). SD's scaled-linear schedule ends at SNR 0.0047, not 0, so training never
# starts from "no image" while sampling does; DDPM's linear schedule (Ho et al. 2020) ends at
# 4e-5; "zero-snr" is SD's betas rescaled to end at SNR 0 with v-prediction, as Lin et al.
# (WACV 2024) fix SD itself (epsilon is undefined at SNR 0). Measured on the world
# (docs/cpu-world.md): neither made the world draw the shapes; "sd" stays the default.
NOISE_SCHEDULES: dict[str, dict] = {
    "sd": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon", "rescale_betas_zero_snr": False},
    "ddpm": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "rescale_betas_zero_snr": False},
    "zero-snr": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
}
# How the world's text encoders learn (train/world.py denoiser, train_text).
TEXT_MODES = ("clip", "joint", "frozen")


def random_colours(rng, count: int) -> list[tuple[str, float]]:
    """(colour word, hue) of ``count`` objects as the world draws them: a word each, its hue jittered."""
    words = list(COLOURS)
    picked = [words[int(rng.integers(len(words)))] for _ in range(count)]
    return [(w, COLOURS[w] + float(rng.uniform(-HUE_JITTER, HUE_JITTER))) for w in picked]


def random_hues(rng, count: int) -> list[float]:
    """The hues alone of ``random_colours`` (the same draws): scenes that name no colour."""
    return [hue for _, hue in random_colours(rng, count)]


def rebuild_command(name: str) -> str:
    """The command that retrains world ``name`` into its shipped place."""
    return f"python scripts/train-world.py --world {name}"


def world_dir(name: str) -> Path:
    return WORLDS_DIR / name


def directory_digests(root: Path, record: str = PROVENANCE) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), the provenance record aside."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != record}


def verify_directory(root: Path, record_file: str, what: str, fix: str) -> dict:
    """The provenance record ``record_file`` in ``root`` after checking every file's sha256
    against it; a missing, extra or altered file is a one-line error naming it and ``fix``.
    ``what`` names the directory in those lines ("the trained world 'world-sdxl'")."""
    record_path = root / record_file
    try:
        record = json.loads(record_path.read_text())
        expected = dict(record["sha256"])
    except FileNotFoundError:
        raise UserError(f"{what} is missing ({record_path} not found)", fix) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{record_path} is not a provenance record ({err})", fix) from None
    actual = directory_digests(root, record=record_file)
    for rel, digest in expected.items():
        if rel not in actual:
            raise UserError(f"{root / rel} of {what} is missing", fix)
        if actual[rel] != digest:
            raise UserError(f"{root / rel} of {what} does not match its sha256 in {record_file}", fix)
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise UserError(f"{root / extra[0]} is not part of {what}", fix)
    return record


def verify_world(name: str, root: Path | None = None) -> dict:
    """The provenance record of world ``name`` after checking every file's sha256 against it."""
    fix = f"rebuild it with `{rebuild_command(name)}`, or restore the shipped files with git"
    return verify_directory(root or world_dir(name), PROVENANCE, f"the trained world {name!r}", fix)

