"""Mask loss over valid queries only: padded queries and classes the teacher missed add nothing.

GD trains "without zero masks": a class the detector did not find has no target, so its
query must not be pushed towards an empty mask. The caller marks such queries invalid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from iosd.errors import UserError


def mask_loss(logits: Tensor, targets: Tensor, valid: Tensor, dice_weight: float = 0.0) -> Tensor:
    """Mean BCE-with-logits over the pixels of valid queries, plus ``dice_weight`` x dice loss.

    logits, targets: (B, Q, S, S), targets in [0, 1]; valid: (B, Q) bool. With no valid
    query the loss is an exact 0 that still backpropagates (zero gradients, never NaN).
    """
    if logits.shape != targets.shape or logits.dim() != 4:
        raise UserError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ", "both must be (B, Q, S, S)")
    if tuple(valid.shape) != tuple(logits.shape[:2]):
        raise UserError(f"valid has shape {tuple(valid.shape)}, expected {tuple(logits.shape[:2])}")
    valid = valid.to(device=logits.device, dtype=torch.bool)
    # where(), not multiplication: garbage (even NaN) logits of padded queries must not leak in.
    safe_logits = torch.where(valid[:, :, None, None], logits, torch.zeros_like(logits))
    safe_targets = torch.where(valid[:, :, None, None], targets.to(logits.dtype), torch.zeros_like(logits))
    pixels = logits.shape[-1] * logits.shape[-2]
    count = valid.sum()
    per_query_bce = F.binary_cross_entropy_with_logits(safe_logits, safe_targets, reduction="none").flatten(2).sum(-1)
    loss = (per_query_bce * valid).sum() / (count * pixels).clamp_min(1)
    if dice_weight:
        loss = loss + dice_weight * (dice_loss(safe_logits, safe_targets) * valid).sum() / count.clamp_min(1)
    return loss


def dice_loss(logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft dice per query, (B, Q): rewards overlap regardless of object size."""
    probs = torch.sigmoid(logits).flatten(2)
    targets = targets.flatten(2)
    overlap = (probs * targets).sum(-1)
    return 1 - (2 * overlap + smooth) / (probs.sum(-1) + targets.sum(-1) + smooth)
