"""Embedded random-weight models of the real classes, small enough for CPU tests and the demo.

``tiny_pipeline``: an SDXL with the same diffusers/transformers classes and block layout as
SDXL-Turbo (so feature-layer paths, text_time conditioning and the two text encoders all
exercise the real code path). ``tiny_sd1_pipeline``: an SD 1.x (one CLIP text encoder, four
UNet levels, DDIM), for the GD recipe's code path. Both are built offline and
deterministically from a seed. The tokenizer is the real CLIP BPE shipped in the
``open_clip_torch`` wheel.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from iosd.errors import UserError

TINY_RESOLUTION = 128
CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407

# SDXL-Turbo's scheduler: Euler ancestral with trailing timesteps.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}

# SDXL's UNet layout (notes.md); the tiny model keeps every structural field and shrinks widths.
SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
}
TINY_UNET_CONFIG = {
    **SDXL_UNET_CONFIG,
    "sample_size": 32,
    "in_channels": 16,  # the tiny VAE's latent width (see TINY_VAE_CONFIG)
    "out_channels": 16,
    "block_out_channels": [32, 64, 64],
    "transformer_layers_per_block": [1, 1, 1],
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 8,
    "cross_attention_dim": 64,  # 32 (encoder 1) + 32 (encoder 2), as 768 + 1280 in SDXL
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 time ids + pooled text (projection 32)
}
# SD 1.4/1.5's UNet (CompVis/stable-diffusion-v1-4, unet/config.json; fields left out are
# diffusers' defaults, which match it). "attention_head_dim" 8 is, in diffusers' naming, 8 heads.
SD1_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}
TINY_SD1_UNET_CONFIG = {
    **SD1_UNET_CONFIG,
    "sample_size": 32,
    "in_channels": 16,  # the tiny VAE's latent width (see TINY_VAE_CONFIG)
    "out_channels": 16,
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,  # the one text encoder's width, as 768 in SD 1.x
}
# SD 1.x's scheduler config with DDIM, GD's sampler (leading spacing: 50 steps end at t=1).
SD1_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],  # three blocks: 4x down, 128 px -> 32x32 latent
    "layers_per_block": 1,
    # 16, not SDXL's 4: a random-weight encoder squeezing 4x4x3 pixels into 4 channels keeps
    # too little of the image for a head to learn from (measured: foreground IoU of a conv
    # probe 0.49 with 4 channels, 0.71 with 16); trained VAEs keep it, random ones do not.
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": TINY_RESOLUTION,
    # As SDXL's 0.13025: scales latents to unit variance (measured std 0.22 on shapes-world
    # images), so re-noising at a small timestep keeps the image above the noise.
    "scaling_factor": 4.5,
    "force_upcast": True,
}


def _text_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # pool at the EOS token, as the real CLIP vocab needs
        pad_token_id=EOS_ID,
    )


def clip_bpe_path() -> Path:
    """The real CLIP BPE merges file shipped in the open_clip_torch wheel (no import of open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CLIP vocabulary is missing", "pip install --no-deps open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise UserError(f"{path} is missing", "reinstall open_clip_torch")
    return path


@cache
def _clip_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab and merges, derived from the BPE file exactly as CLIP builds them."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for c in cs]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIPTokenizer with the real CLIP vocabulary, built offline."""
    vocab, merges = _clip_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad_token)
    tok.model_max_length = 77
    return tok


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    return _seeded(seed, lambda: UNet2DConditionModel(**TINY_UNET_CONFIG)).eval()


def tiny_sd1_unet(seed: int = 0) -> UNet2DConditionModel:
    return _seeded(seed, lambda: UNet2DConditionModel(**TINY_SD1_UNET_CONFIG)).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return _seeded(seed + 1, lambda: AutoencoderKL(**TINY_VAE_CONFIG)).eval()


def tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The embedded random-weight SDXL: every component of the real classes, deterministic."""
    vae = tiny_vae(seed)
    text_encoder = _seeded(seed + 2, lambda: CLIPTextModel(_text_config())).eval()
    text_encoder_2 = _seeded(seed + 3, lambda: CLIPTextModelWithProjection(_text_config())).eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),  # SDXL's second tokenizer pads with "!"
        unet=tiny_unet(seed),
        scheduler=EulerAncestralDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd1_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The embedded random-weight SD 1.x: SD 1.x's block layout, one CLIP encoder, DDIM."""
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(_text_config())).eval(),
        tokenizer=clip_tokenizer(),  # SD 1.x pads with <|endoftext|>
        unet=tiny_sd1_unet(seed),
        scheduler=DDIMScheduler(**SD1_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
