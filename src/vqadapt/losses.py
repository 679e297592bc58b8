"""Training losses: per-sample token cross-entropy and the per-answer weighted mean."""

from __future__ import annotations

import torch
from torch import nn


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-sample mean token cross-entropy, shape (B,)."""
    per_token = nn.functional.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none",
    ).view(labels.shape)
    counts = (labels != -100).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


def weighted_loss(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-answer weighted mean: sum_i w_i * l_i / sum_i w_i (weights all 1 -> the plain mean)."""
    return (per_sample * weights).sum() / weights.sum().clamp(min=1e-12)
