"""The trained world: scenes where colour never names a class, shipped weights that match
their provenance record, a one-line refusal when they do not, and a training run that resumes
after a kill to the same weights."""

from __future__ import annotations

import colorsys
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from iosd import worlds
from iosd.errors import UserError
from iosd.manifest import current_umask
from iosd.worlds import COLOURS, PROVENANCE, WORLDS, directory_digests, verify_world, world_dir

MAX_WORLD_BYTES = 40 * 2**20


def _colour_word(image: np.ndarray, mask: np.ndarray) -> str:
    """The colour word nearest the mean hue of an object's pixels."""
    r, g, b = image[mask].reshape(-1, 3).mean(axis=0) / 255
    hue = colorsys.rgb_to_hsv(r, g, b)[0]
    return min(COLOURS, key=lambda w: min(abs(hue - COLOURS[w]), 1 - abs(hue - COLOURS[w])))


def test_colour_never_identifies_a_class_and_captions_name_every_object():
    from iosd.train.world import caption_templates, sample_scene, world_classes

    rng, classes, templates = np.random.default_rng(0), world_classes([]), caption_templates()
    colours: dict[str, set[str]] = defaultdict(set)
    two = 0
    for _ in range(240):
        image, masks, caption, names = sample_scene(rng, classes, templates)
        two += len(names) == 2
        for name, mask in zip(names, masks, strict=True):
            assert name in caption
            colours[name].add(_colour_word(image, mask))
    assert set(colours) == set(classes)  # every class, seen and unseen, is drawn and named
    assert 60 < two < 180  # one- and two-object scenes
    assert all(len(c) >= 4 for c in colours.values()), dict(colours)


def test_a_world_model_draws_the_shapes_source_in_random_hues():
    """The shapes source under a world's palette: the same class in many colours."""
    from iosd.pipeline.shapes import render_scene
    from iosd.worlds import random_colours

    seen = set()
    for seed in range(40):
        hues = [h for _, h in random_colours(np.random.default_rng([seed, 7]), 1)]
        image, masks = render_scene(["star"], np.random.default_rng(seed), 64, hues)
        seen.add(_colour_word(image, masks[0]))
    assert len(seen) >= 4


def _colours_per_object(image: np.ndarray, masks: np.ndarray) -> list[int]:
    return [len(np.unique(image[m.astype(bool)].reshape(-1, 3), axis=0)) for m in masks if m.any()]


def test_the_plain_style_paints_each_object_in_one_colour():
    """The style a small generator can learn to draw: flat objects, no clutter; the textured
    style keeps its two-tone textures."""
    from iosd.pipeline.shapes import render_scene

    for seed in range(6):
        image, masks = render_scene(["star", "ring"], np.random.default_rng(seed), 64, [0.0, 0.5], style="plain")
        assert _colours_per_object(image, masks) == [1, 1]
        image, masks = render_scene(["star", "ring"], np.random.default_rng(seed), 64, [0.0, 0.5])
        assert min(_colours_per_object(image, masks)) > 1
    with pytest.raises(UserError, match="unknown shapes style 'flat'"):
        render_scene(["star"], np.random.default_rng(0), 64, style="flat")


def test_world_settings_are_refused_in_one_line_before_any_work():
    from iosd.train.world import WorldConfig

    for bad, message in ((dict(style="flat"), "unknown --style"), (dict(vae_kl=-1), "--vae-kl -1"), (dict(schedule="cosine"), "unknown --schedule"),
                         (dict(latent_channels=0), "--latent-channels 0")):
        with pytest.raises(UserError, match=message):
            WorldConfig(**bad)


def test_a_world_keeps_its_style_schedule_and_latent_width(tmp_path, monkeypatch):
    """--style plain --schedule zero-snr --latent-channels 4 end to end: the record says so, the
    loaded pipeline samples under that schedule (v-prediction, SNR 0 at the last timestep) with a
    4-channel latent, and ``--source shapes``
    on that world renders flat objects (the scenes its generator learned)."""
    from conftest import make_shapes_set

    from iosd.pipeline.models import load_model
    from iosd.schema import iter_tar_samples
    from iosd.train.world import WorldConfig, train_world

    record = train_world(WorldConfig(**MICRO, style="plain", vae_kl=1e-4, schedule="zero-snr", latent_channels=4), tmp_path / "world-sdxl", tmp_path / "work", show=False, log=lambda m: None)
    assert record["style"] == "plain" and record["config"]["vae_kl"] == 1e-4 and record["config"]["schedule"] == "zero-snr"
    monkeypatch.setattr(worlds, "WORLDS_DIR", tmp_path)
    loaded = load_model("world-sdxl", device="cpu")
    assert loaded.info["world"]["style"] == "plain"
    scheduler = loaded.pipe.scheduler
    assert scheduler.config.prediction_type == "v_prediction" and float(scheduler.alphas_cumprod[-1]) < 1e-6
    assert loaded.pipe.unet.config.in_channels == loaded.pipe.vae.config.latent_channels == 4
    make_shapes_set(tmp_path / "set", recipe="fast", model="world-sdxl", resolution=64, num_samples=4, shard_size=4)
    samples = list(iter_tar_samples(str(next((tmp_path / "set").glob("shard-*.tar"))), features=False))
    assert len(samples) == 4 and all(_colours_per_object(s.image, s.masks) == [1] * len(s.masks) for s in samples)


MICRO = dict(scenes=24, vae_steps=4, unet_steps=4, batch_size=4, save_every=2, warmup=2)


def _train(tmp_path: Path, name: str, world: str = "world-sdxl"):
    from iosd.train.world import WorldConfig, train_world

    out = tmp_path / name
    train_world(WorldConfig(world=world, **MICRO), out, tmp_path / f"{name}-work", show=False, log=lambda m: None)
    return directory_digests(out), json.loads((out / PROVENANCE).read_text())


@pytest.fixture(scope="module")
def micro_world(tmp_path_factory):
    """A world-sdxl trained for a few steps: the real script's output, in miniature."""
    root = tmp_path_factory.mktemp("micro-world")
    digests, record = _train(root, "world-sdxl")
    return root / "world-sdxl", digests, record


def test_a_trained_world_carries_its_provenance(micro_world):
    root, digests, record = micro_world
    assert record["sha256"] == digests and "unet/diffusion_pytorch_model.safetensors" in digests
    assert record["script"] == "scripts/train-world.py" and record["world"] == "world-sdxl" and record["family"] == "sdxl"
    assert record["config"]["seed"] == 0 and record["unet"]["steps"] == MICRO["unet_steps"] and record["unet"]["final_loss"] > 0
    assert record["palette"] == "random" and verify_world("world-sdxl", root)["sha256"] == digests
    names = record["names"]  # how far apart its text conditioning keeps the class names
    assert names["pairs"] == 66 and 0 < names["variance_in_top_components"][0] <= names["variance_in_top_components"][-1] <= 1
    mode = 0o666 & ~current_umask()
    assert all(p.stat().st_mode & 0o777 == mode for p in root.rglob("*") if p.is_file())  # not safetensors' 0o600


@pytest.mark.parametrize("name", list(WORLDS))
def test_shipped_world_matches_its_provenance(name):
    root = world_dir(name)
    if not (root / PROVENANCE).exists():
        pytest.skip(f"{name} is not shipped yet (python scripts/train-world.py --world {name})")
    record = verify_world(name)
    assert record["script"] == "scripts/train-world.py" and record["world"] == name and record["config"]["seed"] == 0
    assert record["palette"] == "random" and record["family"] == WORLDS[name]["family"]
    assert sum(p.stat().st_size for p in root.rglob("*")) < MAX_WORLD_BYTES


def test_name_geometry_sees_names_that_point_the_same_way():
    import torch

    from iosd.train.name_geometry import centred_cosines

    # two names nearly alike, one opposite them, one apart: what they share (the mean) removed
    cos = centred_cosines(torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert cos[0, 1] > 0.95 and cos[0, 2] < -0.5 and abs(float(cos[0, 0]) - 1) < 1e-6


# The cause of the unmet target in tests/test_learning.py, measured (scripts/world-queries.py,
# 2026-12-07): world-sdxl's trained text encoders put its twelve class names on about one axis
# (91.7% of their centred variance in one direction; square and heart at cosine 0.991, heart and
# hexagon 0.951), so no head can transfer to an unseen name along directions the seen ones do
# not span. Strict: it passes the day a retrained world keeps its names apart.
@pytest.mark.xfail(strict=True, reason="world-sdxl's class names lie on about one axis (docs/cpu-world.md)")
def test_shipped_world_keeps_its_class_names_apart():
    from iosd.pipeline.models import load_model
    from iosd.train.name_geometry import name_geometry

    if not (world_dir("world-sdxl") / PROVENANCE).exists():
        pytest.fail("the trained world is missing: python scripts/train-world.py --world world-sdxl")
    names = verify_world("world-sdxl")["classes"]
    geometry = name_geometry(load_model("world-sdxl", device="cpu").pipe, names)
    assert geometry["variance_in_top_components"][0] <= 0.5, geometry["variance_in_top_components"]
    assert geometry["pairs_above_0.9"] == 0, geometry["closest_pairs"]


@pytest.fixture
def altered_world(micro_world, tmp_path, monkeypatch):
    """A copy of a trained world, its UNet weights changed by one byte, where --model finds it."""
    root = tmp_path / "worlds"
    shutil.copytree(micro_world[0], root / "world-sdxl")
    weights = root / "world-sdxl" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(worlds, "WORLDS_DIR", root)
    return weights


def test_altered_world_weights_stop_in_one_line_before_anything_is_written(altered_world, tmp_path):
    from iosd.pipeline.cli import main as gen_main

    out = tmp_path / "out"
    result = CliRunner().invoke(gen_main, ["--model", "world-sdxl", "--source", "shapes", "--classes", "shapes", "--num-samples", "4", "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and str(altered_world) in lines[0] and "scripts/train-world.py --world world-sdxl" in lines[0], result.output
    assert not out.exists()


def test_missing_world_file_is_named(altered_world):
    altered_world.unlink()
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors .*is missing"):
        verify_world("world-sdxl")


def test_a_missing_world_names_the_command_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setattr(worlds, "WORLDS_DIR", tmp_path)
    with pytest.raises(UserError, match="world-sdxl.*is missing.*scripts/train-world.py --world world-sdxl"):
        verify_world("world-sdxl")


def test_train_world_resumes_after_a_kill_to_the_same_weights(micro_world, tmp_path, monkeypatch):
    import torch

    _, whole, _ = micro_world
    calls = {"n": 0}
    clip = torch.nn.utils.clip_grad_norm_

    def killed_at_step_3(*args, **kwargs):  # the denoiser stage clips once a step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "world-sdxl")
    assert not (tmp_path / "world-sdxl").exists()  # nothing shipped from a killed run
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    resumed, _ = _train(tmp_path, "world-sdxl")
    assert resumed == whole


def test_the_sd1_world_trains_and_loads_as_its_family(tmp_path, monkeypatch):
    """GD's family: one text encoder, the empty prompt's embedding as the unconditional row."""
    from iosd.pipeline.models import load_model

    _train(tmp_path, "world-sd1", world="world-sd1")
    monkeypatch.setattr(worlds, "WORLDS_DIR", tmp_path)
    loaded = load_model("world-sd1", device="cpu")
    assert loaded.family == "sd" and loaded.info["world"]["palette"] == "random" and not loaded.info["random_weights"]
    assert loaded.pipe.unet.config.sample_size * loaded.pipe.vae_scale_factor == worlds.WORLD_SIDE


def test_grounding_attention_computes_what_diffusers_attention_does():
    """The recording processor changes nothing but what it keeps: the UNet's output is
    diffusers' own, and each cross-attention layer leaves a (B, queries, tokens) map."""
    import torch

    from iosd.pipeline.families import get_family
    from iosd.train import grounding
    from iosd.train.world import base_pipeline

    pipe, family = base_pipeline("sdxl", 0), get_family("sdxl")
    latents = torch.randn(2, pipe.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = family.conditioning(pipe, ["a red star", "a disc and a ring"], device=torch.device("cpu"), size=64)
    with torch.no_grad():
        expected = pipe.unet(latents, torch.tensor([10, 500]), **cond).sample
        with grounding.recording(pipe.unet) as store:
            got = pipe.unet(latents, torch.tensor([10, 500]), **cond).sample
        again = pipe.unet(latents, torch.tensor([10, 500]), **cond).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not any(type(p).__name__ == "GroundingProcessor" for p in pipe.unet.attn_processors.values())  # restored
    torch.testing.assert_close(again, expected)
    assert store and all(p.shape[0] == 2 and p.shape[-1] == 77 for p in store)
    torch.testing.assert_close(store[0].sum(-1), torch.ones_like(store[0].sum(-1)))


def test_token_loss_rewards_attention_on_the_named_object_only():
    import torch

    from iosd.train.grounding import token_loss

    mask = torch.zeros(2, 4, 4)
    mask[0, :2, :2] = 1  # the first name's object, top left
    mask[1, 2:, 2:] = 1  # the second's, bottom right
    spans = [[(1, 2), (2, 3)]]

    def loss_for(first_on: int) -> float:
        probs = torch.full((1, 16, 4), 1e-6)
        probs[0, mask[first_on].flatten() > 0, 1] = 1.0  # name 1 attends to object `first_on`
        probs[0, mask[1].flatten() > 0, 2] = 1.0  # name 2 on its own object
        return float(token_loss([probs], spans, [mask]))

    assert loss_for(0) < 0.01  # both names on their own objects
    assert loss_for(1) > 0.45  # the first name on the other object: half the terms fail
    assert float(token_loss([torch.rand(1, 16, 4)], [[]], [torch.zeros(0, 4, 4)])) == 0.0  # an empty caption has no term


def test_scene_masks_are_the_named_objects_at_latent_size():
    from iosd.train.world import WorldConfig, build_scenes

    scenes = build_scenes(WorldConfig(scenes=40))
    for caption, names, masks in zip(scenes.captions, scenes.names, scenes.masks, strict=True):
        assert len(masks) in (1, 2) and masks.shape[1:] == (16, 16)
        assert (not caption and not names) or (len(names) == len(masks) and all(n in caption for n in names))
        assert all(0 < m.astype(float).sum() for m in masks)  # every object is visible somewhere


def test_clip_text_mode_pretrains_the_encoders_then_keeps_them_frozen(tmp_path):
    """--text clip: the encoders change in the contrastive stage (NegCLIP's swapped names among
    the negatives) and not at all while the UNet learns; the record says so."""
    import torch
    from safetensors.torch import load_file

    from iosd.train.contrastive import swapped_caption
    from iosd.train.world import WorldConfig, base_pipeline, train_world

    rng = np.random.default_rng(0)
    assert swapped_caption(rng, "a photograph of a red star", ["star"], ["star", "heart"]) == "a photograph of a red heart"
    out, work = tmp_path / "world-sdxl", tmp_path / "work"
    record = train_world(WorldConfig(**MICRO, text="clip", text_steps=3, text_batch=6), out, work, show=False, log=lambda m: None)
    assert record["config"]["text"] == "clip" and record["text"]["steps"] == 3 and record["text"]["final_loss"] > 0
    initial = base_pipeline("sdxl", 0).text_encoder.state_dict()
    after_text = {k.removeprefix("text_encoder."): v for k, v in load_file(work / "text" / "model.safetensors").items() if k.startswith("text_encoder.")}
    shipped = load_file(out / "text_encoder" / "model.safetensors")
    def norm(weights: dict) -> torch.Tensor:  # the final layer norm, whatever prefix the file gives it
        return next(v for k, v in weights.items() if k.endswith("final_layer_norm.weight"))

    assert not torch.equal(norm(after_text), norm(initial))  # learned in the contrastive stage
    assert torch.equal(norm(shipped), norm(after_text).half())  # untouched by the denoiser stage
    with pytest.raises(UserError, match="--text"):
        WorldConfig(text="both")


def test_a_wider_world_unet_keeps_the_layout_and_the_head_size():
    """--unet-width k: the family's tiny layout with k times the channels and heads (so the
    head size, and with it the attention maps' meaning, stays); 1 is the shipped world's."""
    from iosd.pipeline.tiny import TINY_SD1_UNET_CONFIG, TINY_UNET_CONFIG
    from iosd.train.world import unet_config

    one, two = unet_config("sdxl", 1), unet_config("sdxl", 2)
    assert {**one, "sample_size": TINY_UNET_CONFIG["sample_size"]} == TINY_UNET_CONFIG and one["sample_size"] == 16
    assert two["block_out_channels"] == [64, 128, 128] and two["attention_head_dim"] == [4, 8, 8]
    assert two["down_block_types"] == TINY_UNET_CONFIG["down_block_types"] and two["cross_attention_dim"] == TINY_UNET_CONFIG["cross_attention_dim"]
    assert unet_config("sd", 3)["attention_head_dim"] == 3 * TINY_SD1_UNET_CONFIG["attention_head_dim"]
    with pytest.raises(UserError, match="--unet-width 0"):
        unet_config("sdxl", 0)
    from iosd.train.world import WorldConfig

    with pytest.raises(UserError, match="--unet-width 0"):  # refused before a work directory records it
        WorldConfig(unet_width=0)


def test_frozen_text_and_a_wider_unet_train_end_to_end(tmp_path):
    """--text frozen --unet-width 2: the shipped text encoder is its random initialisation (the
    names stay apart by construction), the shipped UNet has twice the channels, and the record
    holds both settings."""
    import torch
    from safetensors.torch import load_file

    from iosd.train.world import WorldConfig, base_pipeline, train_world

    out = tmp_path / "world-sdxl"
    record = train_world(WorldConfig(**MICRO, text="frozen", unet_width=2), out, tmp_path / "work", show=False, log=lambda m: None)
    assert record["config"]["text"] == "frozen" and record["config"]["unet_width"] == 2 and record["text"] is None
    initial = base_pipeline("sdxl", 0, unet_width=2).text_encoder.state_dict()
    shipped = load_file(out / "text_encoder" / "model.safetensors")
    key = next(k for k in shipped if k.endswith("final_layer_norm.weight"))
    assert torch.equal(shipped[key], initial[key].half())
    assert json.loads((out / "unet" / "config.json").read_text())["block_out_channels"] == [64, 128, 128]


def test_world_compare_refuses_arms_it_cannot_score_before_any_work(tmp_path):
    """The diffusion arms are scored on the head arm's exact-mask test sets: asked for alone,
    world-compare says which arm to run first, in one line, and generates nothing."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for arms, message in (("diffusion", "run --arms head,diffusion"), ("no-such-arm", "unknown arm(s) no-such-arm")):
        done = subprocess.run([sys.executable, str(root / "scripts/world-compare.py"), "--arms", arms, "--out", str(tmp_path / "compare")], cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / "compare" / "shards").exists()


def test_world_x0_reads_how_much_of_a_scene_each_timestep_leaves(micro_world, tmp_path):
    """scripts/world-x0.py on a trained world: per timestep, the SNR and how well the denoiser's
    prediction of the clean latent correlates with the scene (less noise reads more of it), as
    JSON and a grid; a timestep outside the schedule is refused in one line, nothing written."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "IOSD_WORLDS_DIR": str(micro_world[0].parent)}
    out = tmp_path / "x0.png"
    done = subprocess.run([sys.executable, str(root / "scripts/world-x0.py"), "--scenes", "4", "--timesteps", "50,999", "--out", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = json.loads(done.stdout)["timesteps"]
    assert steps["50"]["snr"] > steps["999"]["snr"] and steps["50"]["x0_correlation"] > steps["999"]["x0_correlation"], steps
    assert out.stat().st_size > 0
    bad = subprocess.run([sys.executable, str(root / "scripts/world-x0.py"), "--timesteps", "1000", "--out", str(tmp_path / "x.png")], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "outside 0..999" in bad.stderr and not (tmp_path / "x.png").exists(), bad.stderr
