"""Per-sample pixel losses: each returns shape (B,) so one sample's gradient never depends on the
batch.

An optional weight (B,1,H,W) restricts a loss to the pixels where it is > 0 (the known region of an
inpainting mask): the others contribute exactly nothing, to the value or to the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glo import GloError, is_number


def weighted_mean(err: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample mean of `err` (B,C,H,W), over the pixels where weight > 0 when a weight is
    given."""
    if weight is None:
        return err.flatten(1).mean(1)
    # where, not a product: the hole may hold anything
    err = torch.where(weight > 0, err * weight, 0.0)
    return err.flatten(1).sum(1) / weight.expand_as(err).flatten(1).sum(1).clamp_min(1e-8)


def l2_residual(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """(B,N) vectors whose squared norms are the samples' `l2` losses: the loss as a sum of
    squares."""
    err = pred - target
    if weight is None:
        return err.flatten(1) / err[0].numel() ** 0.5
    weight = weight.expand_as(err)
    err = torch.where(weight > 0, err * weight.sqrt(), 0.0)
    return err.flatten(1) / weight.flatten(1).sum(1, keepdim=True).clamp_min(1e-8).sqrt()


def l1(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    return weighted_mean((pred - target).abs(), weight)


def l2(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    return weighted_mean((pred - target).square(), weight)


class PixelLoss(nn.Module):
    """A weighted sum of L1 and L2 on the raw decoder output (never clamped: clamping kills
    gradients). `scale` multiplies the whole loss, which changes no result (the engine's steps do
    not depend on the loss's scale): glo.bench's loss-scale rows check that it does not."""

    def __init__(self, name: str, l1: float, l2: float, scale: float = 1.0) -> None:
        super().__init__()
        if not (is_number(l1) and is_number(l2) and l1 >= 0 and l2 >= 0 and l1 + l2 > 0):
            raise GloError(
                f"loss '{name}': weights must be numbers >= 0 and not both 0 (l1={l1!r}, l2={l2!r})"
            )
        if not (is_number(scale) and scale > 0):
            raise GloError(f"loss.scale={scale!r}: must be a number > 0")
        self.name, self.w1, self.w2 = name, l1 * scale, l2 * scale

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        loss = 0.0
        if self.w1:
            loss = loss + self.w1 * l1(pred, target, weight)
        if self.w2:
            loss = loss + self.w2 * l2(pred, target, weight)
        return loss
