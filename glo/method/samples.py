"""Per-sample bookkeeping shared by every optimizer: each sample's best latent and its decode, its
loss curve, and why and when it stopped. It lives on the CPU wherever the latents are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Result:
    latents: Tensor  # (B,C,h,w) best latent of each sample
    initial_loss: Tensor  # (B,) loss of the starting latent
    final_loss: Tensor  # (B,) loss of the returned latent
    steps: Tensor  # (B,) Adam updates taken before the sample stopped
    # (B,) decoder passes spent: forward + backward = 1, a forward alone (scoring) = 0.5
    passes: Tensor
    converged: Tensor  # (B,) bool: stopped by the rel_tol rule rather than the budget
    nonfinite: Tensor  # (B,) bool: met a non-finite loss and was reverted to its best latent
    loss_curves: Tensor  # (B,max_steps) loss before each update; NaN once the sample stopped
    initial_decoded: Tensor  # (B,...) decode of z0, and ...
    # ... of `latents`, as the engine computed them (in its precision): no pass to redo
    decoded: Tensor


class Samples:
    """The bookkeeping of n samples over at most max_steps updates."""

    def __init__(self, z0: Tensor, max_steps: int, window: int, rel_tol: float) -> None:
        n, cpu = len(z0), torch.device("cpu")
        self.max_steps, self.window, self.rel_tol = max_steps, window, rel_tol
        self.best = z0.detach().clone()
        self.best_loss = torch.full((n,), float("inf"), device=cpu)
        self.curves = torch.full((n, max_steps), float("nan"), device=cpu)
        self.steps = torch.zeros(n, dtype=torch.long, device=cpu)
        self.passes = torch.zeros(n, device=cpu)
        self.converged = torch.zeros(n, dtype=torch.bool, device=cpu)
        self.nonfinite = torch.zeros(n, dtype=torch.bool, device=cpu)

    def record(
        self, t: int, active: list[int], values: Tensor, pred: Tensor, zs: list[Tensor]
    ) -> list[int]:
        """Score the evaluation after t updates of the samples `active` (a forward pass each): keep
        each one's best latent, send one with a non-finite loss back to its best, stop those whose
        loss is flat or whose budget is spent. Returns the positions in `active` that take another
        update."""
        self.passes[active] += 0.5
        if t == 0:
            # shown: the decode of `best`
            self.initial, self.shown = pred.detach().clone(), pred.detach().clone()
        going = []
        for j, i in enumerate(active):
            v = values[j]
            if t < self.max_steps:
                self.curves[i, t] = v
            if not torch.isfinite(v):
                self.nonfinite[i] = True
                zs[i].data.copy_(self.best[i])
            elif v < self.best_loss[i]:
                self.best_loss[i] = v
                self.best[i] = zs[i].detach()
                self.shown[i] = pred[j].detach()
            if self.nonfinite[i] or t == self.max_steps:
                continue
            if flat(self.curves[i], t, self.window, self.rel_tol):
                self.converged[i] = True
                continue
            going.append(j)
        self.steps[active] = t
        return going

    def result(self) -> Result:
        return Result(
            self.best,
            self.curves[:, 0].clone(),
            self.best_loss,
            self.steps,
            self.passes,
            self.converged,
            self.nonfinite,
            self.curves,
            self.initial,
            self.shown,
        )


def flat(curve: Tensor, t: int, window: int, rel_tol: float) -> bool:
    """The stopping rule: the loss at t changed by at most rel_tol (relative) since t - window."""
    return t >= window and bool(
        abs(curve[t - window] - curve[t]) <= rel_tol * abs(curve[t - window])
    )
