"""optim=lbfgs: torch's L-BFGS with a strong-Wolfe line search, one sample at a time, since each
sample's line search asks for its own evaluations."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from glo.method.samples import Result, flat
from glo.method.settings import Settings


class _Stop(Exception):
    """Ends one sample's L-BFGS run from inside its closure: budget spent, loss flat, or not
    finite."""


def lbfgs(
    objective: Callable[[Tensor, list[int]], tuple[Tensor, Tensor, Tensor | None]],
    z0: Tensor,
    i: int,
    s: Settings,
    on_step: Callable[[int, int, float], None] | None,
) -> Result:
    """Sample i (z0: (1,C,h,w)) by torch.optim.LBFGS with a strong-Wolfe line search. Every
    evaluation the line search asks for is a pass; after max_steps of them one more, forward only,
    scores the last point. The rel_tol rule runs over evaluations. L-BFGS works on u with z = z0 +
    scale * u, scale = lr * elements: torch's first step is the gradient cut to L1 length 1, so in z
    each element moves by about lr on average, like Adam's first step. Later steps are quasi-Newton
    steps, which the scale does not change."""
    scale = s.lr * z0.numel()
    # LBFGS views its grad flat
    u = torch.zeros_like(z0, memory_format=torch.contiguous_format, requires_grad=True)
    # the closure enforces the budget; max_iter only has to be out of its way (iterations <=
    # evaluations)
    opt = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=10 * s.max_steps,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )
    curve = torch.full((1, s.max_steps), float("nan"), device="cpu")
    out = {
        "best": z0.detach().clone(),
        "loss": float("inf"),
        "converged": False,
        "nonfinite": False,
        "evals": 0,
        "passes": 0.0,
    }

    def closure() -> Tensor:
        t = out["evals"]
        opt.zero_grad()
        with torch.set_grad_enabled(t < s.max_steps):
            z = z0 + scale * u
            loss, pred, _ = objective(z, [i])
        v = float(loss.detach())
        out["evals"] += 1
        out["passes"] += 0.5
        if t == 0:
            out["initial"] = out["shown"] = pred.detach()
        if t < s.max_steps:
            curve[0, t] = v
            if on_step:
                on_step(t, 1, v)
        if not math.isfinite(v):
            out["nonfinite"] = True
            raise _Stop
        if v < out["loss"]:
            out.update(best=z.detach().clone(), loss=v, shown=pred.detach())
        if t == s.max_steps:
            raise _Stop
        if flat(curve[0], t, s.window, s.rel_tol):
            out["converged"] = True
            raise _Stop
        out["passes"] += 0.5
        loss.sum().backward()
        return loss.detach().sum()

    try:
        opt.step(closure)
        out["converged"] = True  # L-BFGS ended on its own: no descent direction left
    except _Stop:
        pass
    cpu = {"device": "cpu"}
    return Result(
        out["best"],
        curve[:, 0].clone(),
        torch.tensor([out["loss"]], **cpu),
        torch.tensor([opt.state[u].get("n_iter", 0)], **cpu),
        torch.tensor([out["passes"]], **cpu),
        torch.tensor([out["converged"]], **cpu),
        torch.tensor([out["nonfinite"]], **cpu),
        curve,
        out["initial"],
        out["shown"],
    )
