"""Anderson acceleration: each update starts from the mix of a sample's recent latents that fits the
target best where the decoder is affine, for more gain per decoder pass (anderson > 0,
optim=adam)."""

from __future__ import annotations

import torch
from torch import Tensor

from glo.method.losses import l2_residual


def anderson(
    zs: list[Tensor],
    history: list[list[tuple[Tensor, Tensor, Tensor]]],
    active: list[int],
    going: list[int],
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None,
    moved: Tensor | None,
    anchor: float,
    size: int,
    keep: int,
) -> None:
    """Replace each moving sample's latent and gradient by their mix over its last `keep` iterates.
    The loss is modelled as a sum of squares (L2's; a model of the others): the pixels' residual and
    the anchor's."""
    error = residual(
        pred, target[active], None if weight is None else weight[active], moved, anchor, size
    )
    for j in going:
        latent, h = zs[active[j]], history[active[j]]
        h[:] = (h + [(latent.detach().clone(), error[j], latent.grad)])[-keep:]
        latent.data, latent.grad = mix(h)


@torch.no_grad()
def residual(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None,
    moved: Tensor | None,
    anchor: float,
    size: int,
) -> Tensor:
    """(B,N) vectors whose squared norms are the samples' L2 losses with the anchor's term added:
    the loss as a sum of squares, which the mix minimises."""
    error = l2_residual(pred.detach(), target, weight)
    return (
        torch.cat([error, (anchor / size) ** 0.5 * moved.detach().flatten(1)], 1)
        if anchor
        else error
    )


def mix(history: list[tuple[Tensor, Tensor, Tensor]], reg: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Anderson mixing of (latent, residual, gradient) triples: the affine combination (weights
    summing to 1) of the latents whose residuals combine to the smallest norm, and the same
    combination of their gradients. Exact where the residual is affine in the latent over the
    iterates (a least-squares loss through an affine decoder); `reg` (relative to the mean squared
    residual difference) keeps the weights tame where it is not."""
    z, r, g = history[-1]
    if len(history) < 2:
        # a copy: the optimizer updates the latent in place, the history must keep it
        return z.clone(), g
    d = torch.stack([h[1].flatten() - r.flatten() for h in history[:-1]])  # (k-1, pixels)
    a = d @ d.T
    scale = a.trace() / len(a)
    if not torch.isfinite(scale) or scale <= 0:
        return z.clone(), g
    c = torch.linalg.solve(a + reg * scale * torch.eye(len(a), device=a.device), -(d @ r.flatten()))
    return (
        z + sum(ci * (h[0] - z) for ci, h in zip(c, history[:-1])),
        g + sum(ci * (h[2] - g) for ci, h in zip(c, history[:-1])),
    )
