#!/usr/bin/env python
"""Build a diffusers directory of the real SDXL-Turbo or SD 1.x architecture, random weights, offline.

Why: the GPU benches (``bench/gen.py --model DIR``, ``iosd-gen --model DIR``) must measure the
real UNet, VAE and text encoders (their FLOPs, activations and feature bytes), and the real
weights need a network and a licence click that a bench machine may not have. Random weights
give the same shapes and costs; what they draw is noise.

- ``--family sdxl``: ``StableDiffusionXLPipeline`` as ``stabilityai/sdxl-turbo``: the UNet of
  the family's config (``iosd.pipeline.families``, 2,567 M parameters), the SDXL VAE (scaling
  0.13025, upcast to fp32), CLIP ViT-L/14 (768-d, 12 layers) and OpenCLIP bigG/14 with
  projection (1280-d, 32 layers) text encoders, the real CLIP BPE tokenizers, Euler ancestral
  with trailing timesteps.
- ``--family sd1``: ``StableDiffusionPipeline`` as ``CompVis/stable-diffusion-v1-4``: SD 1.x's
  UNet (860 M), VAE (scaling 0.18215), CLIP ViT-L/14 text encoder, PNDM (v1-4's scheduler;
  the ``gd`` recipe switches to DDIM on its config), no safety checker.
- ``--tiny``: the same classes with the embedded tiny models' configs (``iosd.pipeline.tiny``),
  in seconds, for tests: in float32 its weights are those of ``--model tiny`` / ``tiny-sd1``.

The directory is written to ``DIR.tmp-XXXX`` and renamed to DIR when complete; a
``random-weights.json`` beside ``model_index.json`` says what it is. Real SDXL takes about
10 GB of RAM (the UNet is built in float32, then cast) and 7 GB of disk in float16; SD 1.x
about 4 GB and 2 GB. Prints one JSON object: family, parameters and bytes per component.

Run: ``python scripts/build-real-model.py --family sdxl --out models/sdxl-turbo-random``,
then ``iosd-gen --model models/sdxl-turbo-random ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from iosd.errors import UserError
from iosd.pipeline.models import RANDOM_WEIGHTS_MARKER

FAMILIES = {"sdxl": "sdxl", "sd1": "sd"}  # --family -> iosd.pipeline.families name
MIMICS = {"sdxl": "stabilityai/sdxl-turbo", "sd1": "CompVis/stable-diffusion-v1-4"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MARKER = RANDOM_WEIGHTS_MARKER  # provenance, so nobody takes the directory for the real model

# The VAE of SDXL (and SDXL-Turbo): SD's layout, latents scaled by 0.13025, and force_upcast
# because it overflows in float16. SD 1.x's is the same network with 0.18215.
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SD1_VAE_CONFIG = {**SDXL_VAE_CONFIG, "sample_size": 512, "scaling_factor": 0.18215}

# CLIP text towers as the pipelines' text_encoder*/config.json hold them (the OpenAI ids:
# bos 0, eos 2, pad 1, which make transformers pool at the argmax token, i.e. the first EOS).
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower, with its 1280-d text projection.
CLIP_BIGG_TEXT = {
    **CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


@dataclass(frozen=True)
class Spec:
    """Everything that differs between the builds: the configs of each component."""

    family: str  # "sdxl" | "sd1"
    tiny: bool
    unet: dict
    vae: dict
    text: tuple[dict, ...]  # CLIPTextConfig kwargs, prompt order (SDXL: two)


def spec_of(family: str, tiny: bool = False) -> Spec:
    """The configs of a family's pipeline: the real ones, or the embedded tiny models'."""
    from iosd.pipeline.families import get_family
    from iosd.pipeline.tiny import (
        TINY_SD1_UNET_CONFIG,
        TINY_UNET_CONFIG,
        TINY_VAE_CONFIG,
        _text_config,
    )

    if family not in FAMILIES:
        raise UserError(f"unknown --family {family!r}", f"use one of {', '.join(FAMILIES)}")
    if tiny:
        unet = TINY_UNET_CONFIG if family == "sdxl" else TINY_SD1_UNET_CONFIG
        n_text = 2 if family == "sdxl" else 1
        return Spec(family, True, dict(unet), dict(TINY_VAE_CONFIG), tuple(_text_config().to_dict() for _ in range(n_text)))
    unet = get_family(FAMILIES[family]).unet_config()
    if family == "sdxl":
        return Spec(family, False, unet, dict(SDXL_VAE_CONFIG), (dict(CLIP_L_TEXT), dict(CLIP_BIGG_TEXT)))
    return Spec(family, False, unet, dict(SD1_VAE_CONFIG), (dict(CLIP_L_TEXT),))


def _component_builders(spec: Spec) -> dict[str, tuple[int, Callable[[], torch.nn.Module]]]:
    """name -> (seed offset, constructor), largest first (peak memory: one fp32 component).

    The seed offsets are those of ``iosd.pipeline.tiny``, so a float32 ``--tiny`` build holds
    the weights of ``--model tiny`` (``tiny-sd1``) for the same seed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders: dict[str, tuple[int, Callable[[], torch.nn.Module]]] = {"unet": (0, lambda: UNet2DConditionModel(**spec.unet))}
    if len(spec.text) > 1:
        builders["text_encoder_2"] = (3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec.text[1])))
    builders["text_encoder"] = (2, lambda: CLIPTextModel(CLIPTextConfig(**spec.text[0])))
    builders["vae"] = (1, lambda: AutoencoderKL(**spec.vae))
    return builders


def parameter_counts(spec: Spec) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no time)."""
    counts = {}
    for name, (_, build) in _component_builders(spec).items():
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in build().parameters())
    return counts


def build_components(spec: Spec, seed: int, dtype: torch.dtype, on_start: Callable[[str], None] | None = None, on_done: Callable[[str], None] | None = None) -> dict[str, torch.nn.Module]:
    """Each network with random weights (deterministic from ``seed``), cast to ``dtype`` as
    soon as it is built, so at most one float32 component is resident at a time."""
    out = {}
    for name, (offset, make) in _component_builders(spec).items():
        if on_start:
            on_start(name)
        torch.manual_seed(seed + offset)
        out[name] = make().to(dtype).eval()
        if on_done:
            on_done(name)
    return out


def assemble(spec: Spec, parts: dict[str, torch.nn.Module]):
    """The family's diffusers pipeline around built components, with the real tokenizer and
    the scheduler the mimicked hub directory ships."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    from iosd.pipeline.tiny import SCHEDULER_CONFIG, SD1_SCHEDULER_CONFIG, clip_tokenizer

    if spec.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=parts["vae"],
            text_encoder=parts["text_encoder"],
            text_encoder_2=parts["text_encoder_2"],
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
            unet=parts["unet"],
            scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG),  # sdxl-turbo's: trailing
        )
    return StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=clip_tokenizer(),
        unet=parts["unet"],
        # v1-4's scheduler_config.json: PNDM without PRK steps on SD's betas
        scheduler=PNDMScheduler.from_config({**SD1_SCHEDULER_CONFIG, "skip_prk_steps": True}),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory", "choose a new directory (the build never overwrites)")
    if not out.parent.is_dir():
        raise UserError(f"the parent of --out {out} does not exist", f"create {out.parent} first")


def _shared_mode(root: Path) -> None:
    """The modes any tool's output gets (0o666 / 0o777 less the umask): mkdtemp makes the
    directory 0o700 and safetensors writes its files 0o600, which nobody else could read."""
    from iosd.manifest import current_umask

    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


class _Status:
    """A rich progress line on stderr: stage i of n, what runs now, elapsed time."""

    def __init__(self, total: int, show: bool) -> None:
        self.show, self.total = show, total

    def __enter__(self) -> _Status:
        if self.show:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(SpinnerColumn(), TextColumn("[bold]build[/] {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.total)
        return self

    def __call__(self, message: str) -> None:
        """Show what runs now."""
        if self.show:
            self.bar.update(self.task, description=message)

    def advance(self) -> None:
        if self.show:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.show:
            self.bar.__exit__(*exc)


def build(family: str, out: str | Path, *, dtype: str = "float16", seed: int = 0, tiny: bool = False, quiet: bool = False) -> dict:
    """Build and save the directory; returns the summary printed as JSON. UserError on a
    non-empty ``out``, too little disk, or a failed write (the temp directory is removed)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    out = Path(out).expanduser().absolute()
    _check_out(out)
    spec = spec_of(family, tiny)
    counts = parameter_counts(spec)
    need = sum(counts.values()) * DTYPES[dtype].itemsize
    free = _free_bytes(out.parent)
    if need * 1.02 + (64 << 20) > free:
        raise UserError(f"{out.parent} has {free / 1e9:.1f} GB free; the {family} directory needs about {need / 1e9:.1f} GB", "free space or choose another --out")
    times: dict[str, float] = {}
    tmp: Path | None = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
        with _Status(len(counts) + 2, not quiet) as status:
            t0 = time.perf_counter()
            parts = build_components(spec, seed, DTYPES[dtype], lambda name: status(f"{name}: {counts[name] / 1e6:,.1f} M parameters, random init, then {dtype}"), lambda name: status.advance())
            pipe = assemble(spec, parts)
            times["build_s"] = round(time.perf_counter() - t0, 1)
            status(f"saving {need / 1e9:.2f} GB to {tmp.name}")
            t0 = time.perf_counter()
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / MARKER).write_text(json.dumps(_marker(family, spec, dtype, seed), indent=1) + "\n")
            times["save_s"] = round(time.perf_counter() - t0, 1)
            status.advance()
            _shared_mode(tmp)
            _check_out(out)  # nobody made it meanwhile
            if out.exists():
                out.rmdir()  # empty: rename the finished build over it
            os.replace(tmp, out)
            status(f"done: {out}")
            status.advance()
    except OSError as err:
        _remove(tmp)
        left = _free_bytes(out.parent)
        raise UserError(f"cannot write {out}: {err.strerror or err} ({left / 1e9:.1f} GB free; the build needs about {need / 1e9:.1f} GB)", "free space or choose another --out; nothing was left behind") from None
    except BaseException:
        _remove(tmp)
        raise
    sizes = {name: dir_bytes(out / name) for name in counts}
    return {
        "family": FAMILIES[family],
        "architecture": MIMICS[family] + (" (tiny configs)" if tiny else ""),
        "out": str(out),
        "dtype": dtype,
        "seed": seed,
        "random_weights": True,
        "parameters": {**counts, "total": sum(counts.values())},
        "bytes_on_disk": {**sizes, "total": dir_bytes(out)},
        **times,
    }


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def _marker(family: str, spec: Spec, dtype: str, seed: int) -> dict:
    from iosd import __version__

    return {
        "random_weights": True,
        "architecture_of": MIMICS[family],
        "tiny": spec.tiny,
        "dtype": dtype,
        "seed": seed,
        "built_by": f"iosd {__version__} scripts/build-real-model.py",
        "note": "random weights: real shapes and costs, meaningless images and features",
    }


def _quiet_libraries() -> None:
    """diffusers' per-shard bars and its note on casting with ``to()`` (nothing here must
    stay float32: the VAE is upcast at load time) would bury the status line."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Command line: build, print the JSON summary; one ``error:`` line and exit 2 on failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=list(FAMILIES), help="sdxl: SDXL-Turbo's architecture; sd1: Stable Diffusion v1-4's")
    parser.add_argument("--out", required=True, help="the directory to create (must not exist, or be empty)")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="weights as saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny models' configs (seconds; for tests)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    _quiet_libraries()
    try:
        summary = build(args.family, args.out, dtype=args.dtype, seed=args.seed, tiny=args.tiny, quiet=args.quiet)
    except UserError as err:
        print(f"error: {err.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
