"""CLIP-style pretraining of a world's text encoders, as Stable Diffusion's are pretrained.

SD 1.x and SDXL condition on CLIP text encoders that were trained *contrastively* on
image-caption pairs and stay frozen while the UNet learns. Contrastive training must tell a
"star" caption from a "heart" caption by the image alone, so it keeps class names apart; the
denoising loss does not (measured on world v1, which trained its encoders with the UNet: 91.7%
of the names' variance in one direction, square and heart at cosine 0.99). This module gives a
world the same start: a small image tower and the family's text encoders, trained with the
symmetric InfoNCE loss of CLIP (Radford et al., 2021) on the world's scenes and captions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INIT_TEMPERATURE = 0.07  # CLIP's initial softmax temperature (logit scale log(1/0.07))
MAX_LOGIT_SCALE = 100.0  # CLIP clamps the learned scale here


class ImageTower(nn.Module):
    """A small convolutional image encoder (64 px -> 4 x 4 cells, flattened, not averaged: an
    average of local features keeps too little of an outline to tell a star from a heart),
    with one projection per text encoder so each meets the images in its own space."""

    def __init__(self, text_widths: list[int], width: int = 64, side: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width // 2, width, 2 * width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.body = nn.Sequential(*layers, nn.Flatten())
        cells = (side // 16) ** 2
        self.heads = nn.ModuleList(nn.Linear(channels * cells, w) for w in text_widths)
        self.logit_scale = nn.Parameter(torch.full((len(text_widths),), math.log(1 / INIT_TEMPERATURE)))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        flat = self.body(images)
        return [head(flat) for head in self.heads]


def pooled_text(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    """The caption's pooled embedding as CLIP trains it: the EOS token's final state, through
    the encoder's own projection where it has one (SDXL's second encoder). Padded to the
    longest caption, not to 77: the mask is causal, so the EOS state is the same, 4x cheaper."""
    ids = tokenizer(captions, padding="longest", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    out = encoder(ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


def text_width(encoder) -> int:
    """The width of ``pooled_text`` for this encoder."""
    config = encoder.config
    return config.projection_dim if hasattr(encoder, "text_projection") else config.hidden_size


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, hard: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the batch's image-caption similarities; ``hard``
    captions (one per image, NegCLIP's) are extra negatives for the image-to-text direction."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * image @ text.T
    target = torch.arange(len(image))
    to_text = logits if hard is None else torch.cat([logits, scale * image @ F.normalize(hard, dim=-1).T], dim=1)
    return (F.cross_entropy(to_text, target) + F.cross_entropy(logits.T, target)) / 2


def swapped_caption(rng: np.random.Generator, caption: str, names: list[str], classes: list[str]) -> str:
    """NegCLIP's hard negative (Yuksekgonul et al., ICLR 2023), for class names: the caption
    with one of its classes renamed to another class, so only the name tells them apart."""
    name = names[int(rng.integers(len(names)))]
    other = [c for c in classes if c not in names]
    return caption.replace(name, str(rng.choice(other)), 1)

