"""DAAM baseline: cross-attention heat maps of the prompt tokens (Tang et al., "What the DAAM").

Diffusers' default SDPA processor never materialises attention probabilities, so every
cross-attention module (``attn2`` of each transformer block) gets a capturing processor that
computes its output exactly as ``AttnProcessor2_0`` does and, on the side, the softmax
probabilities it used. Aggregation follows castorini/daam (``daam/trace.py``,
``daam/heatmap.py``):

- only the conditional half of a classifier-free-guidance batch;
- per layer, the probabilities summed over heads and denoising steps;
- each map upsampled to the latent size (bicubic) and clamped at 0, then all layers and
  heads summed (DAAM averages over (layer, head) pairs: the same up to a constant);
- a word of several tokens is the mean of its tokens' maps;
- for a mask: bicubic upsampling to the image size, min-max normalisation, threshold 0.4.
- the mid block is left out, as DAAM's locator does by default (``locate_middle_block=False``).

The same code serves both model families (iosd.pipeline.families): SDXL's cross-attention
at two latent sizes, SD 1.x/2.x's at three (DAAM's own setting); token spans come from the
pipeline's first tokenizer (the only one on SD), whose positions the second one shares on SDXL.

To bound memory, maps are summed on the fly into one (B, h*w, tokens) tensor per latent
size; DAAM clamps each (layer, head) map separately, here the clamp acts on the sum at each
size (bicubic undershoot of non-negative maps is small either way).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from iosd.errors import UserError

DAAM_THRESHOLD = 0.4  # DAAM binarises the normalised word map at 0.4 (daam/utils.py plot_mask_heat_map)
_PROCESSORS_WITH_SAME_MATH = (AttnProcessor2_0, AttnProcessor)


class _CapturingProcessor:
    """AttnProcessor2_0's computation, step for step, plus the cross-attention probabilities."""

    def __init__(self, recorder: DaamRecorder) -> None:
        self.recorder = recorder

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if is_cross and self.recorder.armed:
            self.recorder._add(_attention_probs(query, key, attention_mask).sum(dim=1))

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


@torch.no_grad()
def _attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, heads, queries, tokens) float32 softmax with SDPA's default scale (1/sqrt(head_dim))."""
    scores = query.float() @ key.float().transpose(-1, -2) * (query.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return scores.softmax(dim=-1)


def _grid_of(n_queries: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a UNet level with ``n_queries`` positions: the latent halved k times (rounded up)."""
    h, w = latent_size
    for k in range(12):
        hk, wk = math.ceil(h / 2**k), math.ceil(w / 2**k)
        if hk * wk == n_queries:
            return hk, wk
    raise RuntimeError(f"a cross-attention layer has {n_queries} positions, not a downsampling of the latent {h}x{w}: wrong latent_size")


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of (N, H, W) maps, as DAAM does at every resize."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bicubic", align_corners=False)[:, 0]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (H, W) map to [0, 1]; a constant map becomes all zeros (no evidence)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(1e-12)
    out = (maps - lo[:, None, None]) / span[:, None, None]
    return torch.where((hi - lo > 1e-12)[:, None, None], out, torch.zeros_like(out)).clamp_(0.0, 1.0)


class DaamRecorder:
    """Context manager: records cross-attention of every ``attn2`` while ``armed``.

    Call ``reset()`` before each batch; ``heat_maps`` then returns the DAAM map of each token
    span. Set ``armed = False`` around UNet calls that are not denoising steps.
    """

    def __init__(self, unet: torch.nn.Module, latent_size: tuple[int, int], *, include_mid: bool = False) -> None:
        self.unet = unet
        self.latent_size = (int(latent_size[0]), int(latent_size[1]))
        self.include_mid = include_mid
        self.armed = True
        self.sums: dict[int, torch.Tensor] = {}  # queries per map -> (B, queries, tokens) float32
        self.calls = 0
        self._originals: dict | None = None

    def layer_names(self) -> list[str]:
        """Processor keys of the cross-attention modules DAAM reads (down and up blocks)."""
        names = [k for k in self.unet.attn_processors if k.endswith("attn2.processor")]
        return [k for k in names if self.include_mid or not k.startswith("mid_block.")]

    def __enter__(self) -> DaamRecorder:
        originals = dict(self.unet.attn_processors)
        hooked = self.layer_names()
        if not hooked:
            raise UserError("the UNet has no cross-attention layers (attn2)", "DAAM needs a text-conditioned UNet2DConditionModel")
        odd = sorted({type(originals[k]).__name__ for k in hooked if not isinstance(originals[k], _PROCESSORS_WITH_SAME_MATH)})
        if odd:
            raise UserError(f"DAAM cannot record through attention processors {odd}", "use diffusers' default attention processor (unet.set_default_attn_processor())")
        processors = dict(originals)
        for key in hooked:
            processors[key] = _CapturingProcessor(self)
        self.unet.set_attn_processor(processors)
        self._originals = originals
        return self

    def __exit__(self, *exc) -> None:
        if self._originals is not None:
            self.unet.set_attn_processor(dict(self._originals))
            self._originals = None

    def reset(self) -> None:
        """Forget what was recorded (call before each batch)."""
        self.sums = {}
        self.calls = 0

    def _add(self, head_sum: torch.Tensor) -> None:
        n = head_sum.shape[1]
        held = self.sums.get(n)
        if held is None:
            self.sums[n] = head_sum.detach().clone()
        elif held.shape != head_sum.shape:
            raise RuntimeError(f"cross-attention maps of shape {tuple(head_sum.shape)} after {tuple(held.shape)}: call reset() between batches")
        else:
            held += head_sum.detach()
        self.calls += 1

    @torch.no_grad()
    def token_maps(self, batch_size: int) -> torch.Tensor:
        """(batch_size, tokens, H, W) unnormalised DAAM maps at the latent size.

        With a guidance batch (twice ``batch_size`` rows recorded) the conditional half is used:
        diffusers puts the unconditional half first, as DAAM assumes.
        """
        if not self.sums:
            raise RuntimeError("no cross-attention was recorded: run the UNet inside the recorder after reset()")
        total = None
        for n, sums in self.sums.items():
            rows = sums.shape[0]
            if rows == 2 * batch_size:
                sums = sums[batch_size:]
            elif rows != batch_size:
                raise RuntimeError(f"recorded a batch of {rows} but {batch_size} items asked for: one span list per prompt, reset() per batch")
            h, w = _grid_of(n, self.latent_size)
            grid = sums.view(batch_size, h, w, -1).permute(0, 3, 1, 2)  # (B, tokens, h, w)
            up = _resize(grid.reshape(-1, h, w), self.latent_size).clamp(min=0).view(batch_size, -1, *self.latent_size)
            total = up if total is None else total + up
        return total

    @torch.no_grad()
    def heat_maps(self, token_spans: list[list[tuple[int, int]]], out_size: int) -> list[np.ndarray]:
        """Per item: float32 (len(spans), out_size, out_size), each span's map normalised to [0, 1]."""
        maps = self.token_maps(len(token_spans))
        tokens = maps.shape[1]
        out = []
        for b, spans in enumerate(token_spans):
            if not spans:
                out.append(np.zeros((0, out_size, out_size), np.float32))
                continue
            for start, end in spans:
                if not 0 <= start < end <= tokens:
                    raise ValueError(f"token span [{start}, {end}) is not inside the {tokens} prompt tokens")
            words = torch.stack([maps[b, s:e].mean(dim=0) for s, e in spans])
            words = _normalise(_resize(words, (out_size, out_size)))
            out.append(words.float().cpu().numpy())
        return out


def daam_masks(heat: np.ndarray, size: int, threshold: float = DAAM_THRESHOLD) -> np.ndarray:
    """Boolean masks (N, size, size) (or (size, size) for one map) from stored DAAM heat maps:
    bicubic upsampling, min-max normalisation, ``> threshold`` (DAAM's ``expand_as``)."""
    heat = np.asarray(heat, dtype=np.float32)
    single = heat.ndim == 2
    if heat.ndim not in (2, 3):
        raise ValueError(f"DAAM heat maps must be (N, h, w) or (h, w), got shape {heat.shape}")
    maps = torch.from_numpy(heat[None] if single else heat)
    if maps.shape[0] == 0:
        return np.zeros((0, size, size), bool)
    masks = (_normalise(_resize(maps, (size, size))) > threshold).numpy()
    return masks[0] if single else masks
