"""Token grounding for the world generator: each class name's cross-attention should fall on
its object (TokenCompose, Wang et al., CVPR 2024, its token loss ``L_token``).

Why: Stable Diffusion's cross-attention localises words because it saw billions of captioned
images; a 20 MB world trained for half an hour on 16,000 scenes does not get there from
captions alone (measured: with captions only, DAAM's maps of a class name marked the
background, and two classes in one image could not be told apart). The grounding loss gives
the miniature generator the property the papers start from, on every class the world knows
(seen and unseen alike: the generator knows all classes, as SDXL knows COCO's). The head
never sees an unseen class's mask; the blind world (trained without the unseen classes)
measures how much of the head's transfer comes from what the generator learned.

The recording processor computes attention exactly as diffusers' ``AttnProcessor`` does
(explicit softmax, so its probabilities carry gradients), for ``attn2`` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


class GroundingProcessor:
    """Cross-attention with its probabilities kept (with gradients) while ``recording``."""

    def __init__(self, store: list) -> None:
        self.store = store

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        batch, queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(context), attn.to_v(context)
        dim = k.shape[-1] // heads
        q, k, v = (x.view(batch, -1, heads, dim).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * dim**-0.5).softmax(dim=-1)  # (B, heads, queries, tokens)
        self.store.append(probs.mean(dim=1))
        out = (probs @ v).transpose(1, 2).reshape(batch, queries, heads * dim)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


@contextmanager
def recording(unet) -> Iterator[list]:
    """Every ``attn2`` of ``unet`` records into the yielded list; its own processors come back
    on exit (the shipped UNet runs diffusers' attention)."""
    store: list = []
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({key: GroundingProcessor(store) if key.endswith("attn2.processor") else proc for key, proc in originals.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)


def token_loss(store: list, spans: list[list[tuple[int, int]]], masks: list[torch.Tensor]) -> torch.Tensor:
    """TokenCompose's L_token: 1 - (attention mass inside the object) / (all attention mass),
    per class name (its tokens' maps averaged) and layer, averaged over all of them.

    ``spans[b]``: the token span of each object's name in caption b ([] for an empty caption);
    ``masks[b]``: (objects, S, S) float masks at the latent side S.
    """
    terms = []
    for probs in store:
        queries = probs.shape[1]
        side = int(round(queries**0.5))
        for b, (item_spans, item_masks) in enumerate(zip(spans, masks, strict=True)):
            if not item_spans:
                continue
            target = F.adaptive_avg_pool2d(item_masks[None], side)[0].flatten(1)  # (objects, queries)
            for j, (start, end) in enumerate(item_spans):
                a = probs[b, :, start:end].mean(dim=-1)
                terms.append(1 - (a * target[j]).sum() / a.sum().clamp_min(1e-8))
    return torch.stack(terms).mean() if terms else torch.zeros(())
