"""Per-sample pixel losses: each returns shape (B,) so one sample's gradient never depends on the batch."""
from __future__ import annotations

from torch import Tensor, nn

from glo import GloError


def l1(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().flatten(1).mean(1)


def l2(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).square().flatten(1).mean(1)


class PixelLoss(nn.Module):
    """A weighted sum of L1 and L2 on the raw decoder output (never clamped: clamping kills gradients)."""

    def __init__(self, name: str, l1: float, l2: float) -> None:
        super().__init__()
        if l1 < 0 or l2 < 0 or l1 + l2 == 0:
            raise GloError(f"loss '{name}': weights must be >= 0 and not both 0 (l1={l1}, l2={l2})")
        self.name, self.w1, self.w2 = name, l1, l2

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        loss = 0.0
        if self.w1:
            loss = loss + self.w1 * l1(pred, target)
        if self.w2:
            loss = loss + self.w2 * l2(pred, target)
        return loss
