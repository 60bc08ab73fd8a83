"""The SD 1.x family beside SDXL: the tiny SD 1.x, guidance with both halves, the renoised
pass, class embeddings and DAAM on one text encoder, loading by pipeline class, and the
GD / IOSD layer lists measured on the real UNet configs (meta device)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from iosd.errors import UserError
from iosd.pipeline.capture import FeatureCapture, layer_shapes, sd1_layer_shapes, sdxl_layer_shapes
from iosd.pipeline.models import TINY_SD1, load_model
from iosd.pipeline.sources import diffuse, renoised_pass
from iosd.pipeline.text import (
    QuerySpec,
    class_embeddings,
    embedding_spec,
    find_token_span,
    text_encoders,
)
from iosd.pipeline.tiny import TINY_RESOLUTION, TINY_SD1_UNET_CONFIG

SIZE = TINY_RESOLUTION

# GD (Grounded Diffusion): every SD 1.x input block (12), the middle block, every output block (12).
GD_LAYERS = (
    "conv_in",
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers.0",
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.1.downsamplers.0",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "down_blocks.2.downsamplers.0",
    "down_blocks.3.resnets.0", "down_blocks.3.resnets.1",
    "mid_block",
    "up_blocks.0.resnets.0", "up_blocks.0.resnets.1", "up_blocks.0.upsamplers.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.upsamplers.0",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.2.upsamplers.0",
    "up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2",
)  # fmt: skip
# IOSD: the official hooks on SDXL's input, middle and output blocks (notes.md).
IOSD_LAYERS = (
    "conv_in",
    "down_blocks.0.resnets.0", "down_blocks.0.resnets.1", "down_blocks.0.downsamplers.0",
    "down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "down_blocks.1.downsamplers.0",
    "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "mid_block",
    "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.0.upsamplers.0",
    "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.upsamplers.0",
    "up_blocks.2.resnets.0", "up_blocks.2.resnets.1", "up_blocks.2.resnets.2",
)  # fmt: skip
COMPACT = ("up_blocks.1.attentions.2", "up_blocks.3.attentions.2")


def groups(shapes: dict[str, list[int]]) -> dict[int, int]:
    """Spatial side -> total channels."""
    out: dict[int, int] = {}
    for c, h, w in shapes.values():
        assert h == w
        out[h] = out.get(h, 0) + c
    return dict(sorted(out.items()))


@pytest.fixture(scope="module")
def sd1():
    return load_model(TINY_SD1, device="cpu")


def test_tiny_sd1_is_sd1_shaped(sd1):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = sd1.pipe
    assert isinstance(pipe, StableDiffusionPipeline) and sd1.family == "sd" and sd1.info["family"] == "sd"
    assert [type(b).__name__ for b in pipe.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in pipe.unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert getattr(pipe, "text_encoder_2", None) is None and len(text_encoders(pipe)) == 1
    sched = pipe.scheduler
    assert isinstance(sched, DDIMScheduler) and not sched.config.set_alpha_to_one and sched.config.steps_offset == 1
    sched.set_timesteps(50)
    assert int(sched.timesteps[-1]) == 1  # GD's last DDIM step
    # deterministic: a second build has the same weights
    again = load_model(TINY_SD1, device="cpu").pipe.unet.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in pipe.unet.state_dict().items())


def test_guided_generation_captures_both_halves(sd1):
    prompts, seeds = ["a photograph of a dog", "a photograph of a cat and a bird"], [3, 4]
    kw = dict(steps=2, size=SIZE, guidance=5.0, feature_step=-1, feature_t=None)
    with FeatureCapture(sd1.pipe.unet, COMPACT, halves="both") as cap:
        both = diffuse(sd1, cap, prompts, seeds, **kw)
    with FeatureCapture(sd1.pipe.unet, COMPACT, halves="cond") as cap:
        cond = diffuse(sd1, cap, prompts, seeds, **kw)
    assert both.images.shape == (2, SIZE, SIZE, 3) and both.images.dtype == np.uint8
    np.testing.assert_array_equal(both.images, cond.images)  # capture never changes the images
    for path in COMPACT:
        b, c = both.features[path], cond.features[path]
        assert b.shape[0] == c.shape[0] == 2 and b.shape[1] == 2 * c.shape[1] and b.shape[2:] == c.shape[2:]
        half = c.shape[1]
        torch.testing.assert_close(b[:, half:], c)  # conditional second
        assert not torch.allclose(b[:, :half], c)  # unconditional first: a different map
    # without guidance there is no unconditional half to keep
    with FeatureCapture(sd1.pipe.unet, COMPACT, halves="both") as cap, pytest.raises(UserError, match="guidance"):
        diffuse(sd1, cap, prompts[:1], seeds[:1], **{**kw, "guidance": 0.0})


def test_capture_is_at_the_requested_denoising_call(sd1):
    """feature_step -1 is the last UNet call (GD), not the first."""
    with FeatureCapture(sd1.pipe.unet, COMPACT[:1]) as cap:
        last = diffuse(sd1, cap, ["a dog"], [1], steps=3, size=SIZE, guidance=5.0, feature_step=-1, feature_t=None).features
        first = diffuse(sd1, cap, ["a dog"], [1], steps=3, size=SIZE, guidance=5.0, feature_step=0, feature_t=None).features
    assert not torch.allclose(last[COMPACT[0]], first[COMPACT[0]])


def test_renoised_pass_on_sd1(sd1):
    latents = torch.randn(2, TINY_SD1_UNET_CONFIG["in_channels"], SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    with FeatureCapture(sd1.pipe.unet, GD_LAYERS) as cap:
        cond = renoised_pass(sd1, cap, latents, ["a dog", "a cat"], [0, 1], 50, SIZE)
    with FeatureCapture(sd1.pipe.unet, GD_LAYERS, halves="both") as cap:
        both = renoised_pass(sd1, cap, latents, ["a dog", "a cat"], [0, 1], 50, SIZE)
    assert list(cond) == list(GD_LAYERS)
    for path in GD_LAYERS:
        c, b = cond[path], both[path]
        assert c.shape[0] == 2 and b.shape[1] == 2 * c.shape[1]
        torch.testing.assert_close(b[:, c.shape[1] :], c, atol=1e-5, rtol=1e-4)
    # the tiny SD 1.x has GD's layout: four sides, 8x down from the latent, as 8/16/32/64 at 512 px
    assert sorted(groups({p: list(t.shape[1:]) for p, t in cond.items()})) == [4, 8, 16, 32]


def test_class_embeddings_from_the_one_encoder(sd1):
    pipe = sd1.pipe
    hidden = pipe.text_encoder.config.hidden_size
    spec = QuerySpec("a photograph of a {}", "mean", "final")
    emb = class_embeddings(pipe, ["hair drier", "cat"], spec)
    assert emb.shape == (2, hidden)
    ids = pipe.tokenizer("a photograph of a hair drier", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        final = pipe.text_encoder(ids).last_hidden_state[0]
    np.testing.assert_allclose(emb[0], final[5:7].mean(0).numpy(), atol=1e-5)
    record = embedding_spec(pipe, spec)
    assert record["encoders"] == ["text_encoder"] and record["dims"] == [hidden] and record["dim"] == hidden


def test_daam_on_sd1(sd1):
    from iosd.pipeline.daam import DaamRecorder

    prompt = "a photograph of a dog and a cat"
    spans = [[find_token_span(sd1.pipe.tokenizer, prompt, n) for n in ("dog", "cat")]]
    latent = SIZE // sd1.pipe.vae_scale_factor
    with FeatureCapture(sd1.pipe.unet, COMPACT, halves="both") as cap, DaamRecorder(sd1.pipe.unet, (latent, latent)) as rec:
        rec.reset()
        diffuse(sd1, cap, [prompt], [0], steps=2, size=SIZE, guidance=5.0, feature_step=-1, feature_t=None, daam=rec)
        assert next(iter(rec.sums.values())).shape[0] == 2  # the guidance batch was recorded ...
        heat = rec.heat_maps(spans, 32)[0]  # ... and its conditional half used
    assert heat.shape == (2, 32, 32) and heat.dtype == np.float32
    assert np.allclose(heat.max(axis=(1, 2)), 1.0) and np.allclose(heat.min(axis=(1, 2)), 0.0)
    assert np.abs(heat[0] - heat[1]).max() > 1e-3


def test_gd_layers_on_the_real_sd1_unet():
    cond = sd1_layer_shapes(GD_LAYERS)
    both = sd1_layer_shapes(GD_LAYERS, halves="both")
    assert len(GD_LAYERS) == 25
    assert groups(cond) == {8: 1280 * 6, 16: 1280 * 5 + 640, 32: 1280 + 640 * 4 + 320, 64: 640 + 320 * 6}
    assert groups(both) == {8: 2 * 1280 * 6, 16: 2 * (1280 * 5 + 640), 32: 2 * (1280 + 640 * 4 + 320), 64: 2 * (640 + 320 * 6)}
    # up-block layers before the upsampler run at the lower side
    assert cond["up_blocks.0.resnets.1"][1:] == [8, 8] and cond["up_blocks.0.upsamplers.0"][1:] == [16, 16]
    assert cond["up_blocks.2.attentions.1"] == [640, 32, 32] and cond["up_blocks.2.upsamplers.0"] == [640, 64, 64]


def test_iosd_layers_on_the_real_sdxl_unet():
    shapes = sdxl_layer_shapes(IOSD_LAYERS)
    assert len(IOSD_LAYERS) == 19
    assert groups(shapes) == {16: 7040, 32: 4160, 64: 2560}
    assert groups(sdxl_layer_shapes(IOSD_LAYERS, halves="both")) == {16: 14080, 32: 8320, 64: 5120}
    assert layer_shapes("sdxl", IOSD_LAYERS) == shapes


def test_both_layer_lists_exist_on_the_tiny_models(sd1, tiny_loaded):
    for path in GD_LAYERS:
        sd1.pipe.unet.get_submodule(path)
    for path in IOSD_LAYERS:
        tiny_loaded.pipe.unet.get_submodule(path)
    with pytest.raises(UserError, match="no module"):
        FeatureCapture(sd1.pipe.unet, ("down_blocks.3.attentions.0",))  # SD 1.x's last down block has none


def test_load_model_reads_the_family_from_a_saved_directory(sd1, tmp_path):
    sd1.pipe.save_pretrained(tmp_path / "sd1")
    loaded = load_model(str(tmp_path / "sd1"), device="cpu")
    assert loaded.family == "sd" and loaded.info["family"] == "sd" and not loaded.info["random_weights"]
    assert type(loaded.pipe).__name__ == "StableDiffusionPipeline"
    assert loaded.pipe.vae.dtype == torch.float32
    ref = sd1.pipe.unet.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.pipe.unet.state_dict().items())


def test_directories_that_are_not_pipelines_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        load_model(str(tmp_path / "empty"), device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UserError, match="FluxPipeline") as err:
        load_model(str(other), device="cpu")
    assert "\n" not in err.value.problem


def test_tiny_sdxl_still_loads_as_sdxl(tiny_loaded):
    assert tiny_loaded.family == "sdxl" and tiny_loaded.info["family"] == "sdxl"


def test_a_saved_pipeline_loads_quietly_and_says_its_precision_once(sd1, tmp_path):
    """The libraries' loading bars and warnings are silenced; iosd says what matters itself."""
    from click.testing import CliRunner

    from iosd.pipeline.cli import main as gen_main

    sd1.pipe.save_pretrained(tmp_path / "sd1")
    args = ["--model", str(tmp_path / "sd1"), "--recipe", "gd", "--classes", "shapes", "--source", "shapes", "--resolution", "64",
            "--num-samples", "2", "--shard-size", "2", "--batch-size", "2", "--out", str(tmp_path / "set")]
    result = CliRunner().invoke(gen_main, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("runs in float32 on cpu") == 1, result.output
    assert "Loading pipeline components" not in result.output and "kept in float32" not in result.output, result.output
