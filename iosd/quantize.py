"""The one definition of how features become their stored dtype, in torch so that it runs
where the features are: iosd-gen quantises on the device before the copy to the host (a
quarter of float32's bytes over PCIe for int8 / fp8), ``featstore.encode_features`` runs the
same function on the CPU, and both write the same bits.

Stored forms (``iosd.featstore`` documents the zarr layout):

- ``float16``: the IEEE half (round to nearest even);
- ``bfloat16``: the bfloat16 bits, as int16 (NumPy reads them as uint16);
- ``int8``: round(x / scale) clipped to +-127, scale = amax / 127 per channel;
- ``fp8``: float8 e4m3fn of x / scale (round to nearest even, clipped to +-448), scale = amax
  / 448 per channel, as uint8 bits.

Scales are float32, 1 for an all-zero channel; a NaN or infinite value makes its channel's
scale non-finite, which the loader refuses.
"""

from __future__ import annotations

import torch

from iosd.errors import UserError
from iosd.layers import FEATURE_DTYPES

FP8_MAX = 448.0  # largest finite float8 e4m3fn
TOPS = {"int8": 127.0, "fp8": FP8_MAX}  # the stored value a channel's largest magnitude maps to


def channel_scales(x32: torch.Tensor, top: float) -> torch.Tensor:
    """Per-(sample, channel) amax / top of a (B, C, ...) float32 batch; 1 where amax is 0."""
    if x32.numel() == 0:
        return torch.ones(x32.shape[:2], dtype=torch.float32, device=x32.device)
    amax = x32.abs().flatten(2).amax(dim=2)
    return torch.where(amax == 0, torch.ones_like(amax), amax / top)


def check_feature_dtype(dtype: str) -> None:
    """Refuse, in one line, a dtype iosd does not know or this torch cannot cast to."""
    if dtype not in FEATURE_DTYPES:
        raise UserError(f"unknown feature dtype {dtype!r}", f"use one of {', '.join(FEATURE_DTYPES)}")
    if dtype == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise UserError(f"--feature-dtype fp8 needs float8 support in torch (torch {torch.__version__} has no float8_e4m3fn; fp8 is the recipes' default)", "upgrade torch to 2.1 or newer, or pass --feature-dtype int8")


def quantize_tensor(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored tensor, per-channel float32 scales or None) of a (B, C, ...) batch of features,
    on ``x``'s device."""
    if dtype == "float16":
        return x.to(torch.float16), None
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16), None
    check_feature_dtype(dtype)
    x32 = x.to(torch.float32)
    top = TOPS[dtype]
    scale = channel_scales(x32, top)
    y = x32 / scale.reshape(*scale.shape, *([1] * (x32.dim() - 2)))
    if dtype == "int8":
        return y.round_().clamp_(-top, top).to(torch.int8), scale
    return y.clamp_(-top, top).to(torch.float8_e4m3fn).view(torch.uint8), scale  # NaN stays NaN
