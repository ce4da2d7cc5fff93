"""The algorithm: fit each image's latent through the frozen decoder with Adam (or L-BFGS).

Each sample's latent is its own leaf tensor. Every step decodes only the *active* latents,
stacked, and backpropagates the sum of their per-sample losses. A sample leaves the active set
when its loss stops changing (relative change over `window` steps at most `rel_tol`) or when the
budget of `max_steps` updates is spent. Adam skips parameters whose `.grad` is None, so stopped
samples keep their state and each keeps its own step count. Every sample keeps the best latent it
has seen, so the result is never worse than the start, and a non-finite loss sends that sample
back to its best latent instead of ending the batch. With `anderson` > 0, each update starts from
the mix of the sample's recent latents that fits the target best where the decoder is affine
(Anderson acceleration, `mix`): more gain per decoder pass. optim=lbfgs runs torch's L-BFGS instead,
one sample at a time (`_lbfgs`), since each sample's line search asks for its own evaluations.
Plain PyTorch: no Lightning, no disk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

from glo import GloError, is_number
from glo.hardware import PRECISIONS, check_precision, resolve_precision
from glo.losses import l2_residual

OPTIMS = ("adam", "gradfree", "lbfgs")
# A per-pixel mean's gradient, ~2 * error / pixels, is below fp16's range at SD sizes: the latents' gradient came out
# all zeros at 512 px. So in fp16 it crosses the decoder multiplied by this (exact, a power of two; GradScaler's start)
# and is divided back before it reaches the latents. bf16 has fp32's range and needs no scaling.
FP16_GRAD_SCALE = 2.0**16
SCHEDULES = ("constant", "cosine")
ANCHORS = ("z0", "posterior")


@dataclass(frozen=True)
class Settings:
    """Every knob of the method, checked once, passed whole. Built by Hydra from `engine:` in conf/run.yaml,
    which holds every default: no knob has a second default here."""

    optim: str                  # adam (back-propagate the pixel loss) | lbfgs (the same, quasi-Newton with a line
                                # search, one sample at a time) | gradfree (follow E(D(z)) - E(x))
    lr: float
    betas: tuple[float, float]  # Adam's
    eps: float                  # Adam's, per latent element of the sample (so image size does not change it): larger
                                # moves the elements the loss barely responds to by less than lr per step
    anchor: float               # weight of mean(((z - z0) / scale)^2) added to each sample's loss: a pull toward z0
    anchor_to: str              # z0: scale 1 | posterior: scale = the encoder's posterior std over its mean on the
                                # image (a Mahalanobis pull with the same average strength as z0's)
    anderson: int               # > 0: each update starts from the mix of the last `anderson` iterates whose loss, as
                                # least squares extrapolated linearly, is smallest (Anderson acceleration);
                                # optim=adam only
    channel_lr: tuple[float, ...] | None  # one multiplier of Adam's step per latent channel, or None (all 1);
                                # optim=adam only
    schedule: str               # constant | cosine (to 0 at max_steps)
    warmup_steps: int
    max_steps: int              # update budget per image
    rel_tol: float              # a sample stops when its loss changed by at most rel_tol (relative) ...
    window: int                 # ... over the last `window` steps
    precision: str              # the decoder's autocast dtype: auto | fp32 | bf16 | fp16

    def __post_init__(self) -> None:
        betas = self.betas
        ok = isinstance(betas, (list, tuple))
        if not (ok and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)):
            raise GloError(f"betas={list(betas) if ok else betas}: must be two numbers in [0, 1), "
                           "e.g. 'betas=[0.9,0.999]'")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        lrs = self.channel_lr
        if lrs is not None:
            if not (isinstance(lrs, (list, tuple)) and lrs and all(is_number(c) and c >= 0 for c in lrs)):
                raise GloError(f"channel_lr={lrs}: must be null or one number >= 0 per latent channel, "
                               "e.g. 'channel_lr=[8,1,1,1]'")
            object.__setattr__(self, "channel_lr", tuple(float(c) for c in lrs))
        for key, kind in (("lr", float), ("eps", float), ("anchor", float), ("rel_tol", float), ("max_steps", int),
                          ("window", int), ("warmup_steps", int), ("anderson", int)):
            if not is_number(getattr(self, key), kind):
                kind_name = "a finite number" if kind is float else "an integer"
                raise GloError(f"{key}={getattr(self, key)!r}: must be {kind_name}")
        for ok, message in (
            (self.lr > 0, f"lr={self.lr}: must be > 0"),
            (self.max_steps >= 1, f"max_steps={self.max_steps}: must be >= 1"),
            (self.rel_tol >= 0, f"rel_tol={self.rel_tol}: must be >= 0"),
            (self.window >= 1, f"window={self.window}: must be >= 1"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps}: must be >= 0"),
            (self.warmup_steps <= self.max_steps,
             f"warmup_steps={self.warmup_steps}: must be <= max_steps={self.max_steps}, or lr is never reached"),
            (self.eps > 0, f"eps={self.eps}: must be > 0"),
            (self.anchor >= 0, f"anchor={self.anchor}: must be >= 0"),
            (self.anderson >= 0, f"anderson={self.anderson}: must be >= 0"),
            (self.anchor == 0 or self.optim != "gradfree", f"anchor={self.anchor}: gradfree has no loss to add it to"),
            (self.channel_lr is None or self.optim == "adam", f"channel_lr: optim={self.optim} takes no Adam steps"),
            (self.anchor_to in ANCHORS, f"anchor_to={self.anchor_to}: must be one of {', '.join(ANCHORS)}"),
            (self.optim in OPTIMS, f"optim={self.optim}: must be one of {', '.join(OPTIMS)}"),
            (self.schedule in SCHEDULES, f"schedule={self.schedule}: must be one of {', '.join(SCHEDULES)}"),
        ):
            if not ok:
                raise GloError(message)
        check_precision(self.precision)


@dataclass
class Result:
    latents: Tensor       # (B,C,h,w) best latent of each sample
    initial_loss: Tensor  # (B,) loss of the starting latent
    final_loss: Tensor    # (B,) loss of the returned latent
    steps: Tensor         # (B,) Adam updates taken before the sample stopped
    passes: Tensor        # (B,) decoder passes spent: forward + backward = 1, a forward alone (scoring) = 0.5
    converged: Tensor     # (B,) bool: stopped by the rel_tol rule rather than the budget
    nonfinite: Tensor     # (B,) bool: met a non-finite loss and was reverted to its best latent
    loss_curves: Tensor   # (B,max_steps) loss before each update; NaN once the sample stopped
    initial_decoded: Tensor  # (B,...) decode of z0, and ...
    decoded: Tensor          # ... of `latents`, as the engine computed them (in its precision): no pass to redo


def optimize(
    decode: Callable[[Tensor], Tensor],
    z0: Tensor,
    target: Tensor,
    loss_fn: Callable[..., Tensor],
    s: Settings,
    *,
    weight: Tensor | None = None,
    encode: Callable[[Tensor], Tensor] | None = None,
    z0_std: Tensor | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Result:
    """Optimize latents z (B,C,h,w) so that loss_fn(decode(z), target[, weight]) -> (B,) falls, sample by sample.

    weight: (B,1,H,W) per-pixel loss weights (e.g. an inpainting mask's known region), passed to loss_fn.
    encode: the encoder, needed by optim=gradfree (Hong et al., NeurIPS 2024): Adam follows E(D(z)) - E(x)
    instead of the back-propagated gradient, so no backward pass runs; z0 must be E(x).
    z0_std: the encoder's posterior std (like z0), needed by anchor_to=posterior.
    The decoder runs in s.precision (auto: what this device runs natively); latents, Adam and the loss stay fp32.
    """
    gradfree = s.optim == "gradfree"
    if gradfree and encode is None:
        raise ValueError("optim=gradfree needs the encoder")
    if s.anchor and s.anchor_to == "posterior" and z0_std is None:
        raise ValueError("anchor_to=posterior needs the posterior std")
    if z0_std is not None:  # relative to its mean per image: the shape of the encoder's doubt, not its size, so one
        # `anchor` means the same for both scales (an SD encoder's std is ~0.01: divided by it, the pull was 1e4x)
        z0_std = z0_std / z0_std.mean((1, 2, 3), keepdim=True)
    max_steps, rel_tol, window = s.max_steps, s.rel_tol, s.window
    n = z0.shape[0]
    if s.channel_lr is not None and len(s.channel_lr) != z0.shape[1]:
        raise GloError(f"channel_lr={list(s.channel_lr)}: has {len(s.channel_lr)} values, but this VAE's latents have "
                       f"{z0.shape[1]} channels")
    autocast = PRECISIONS[resolve_precision(s.precision, z0.device)[0]]
    low_precision = torch.autocast(z0.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None)
    grad_scale = FP16_GRAD_SCALE if autocast is torch.float16 else 1.0

    def objective(z: Tensor, idx: list[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sample losses of latents z (the samples idx), their decodes in fp32, and the anchor's displacement."""
        with low_precision:
            pred = decode(_ScaleGrad.apply(z, 1 / grad_scale)).float()
        pred = _ScaleGrad.apply(pred, grad_scale)
        losses = loss_fn(pred, target[idx]) if weight is None else loss_fn(pred, target[idx], weight[idx])
        moved = None
        if s.anchor:
            moved = z - z0[idx] if s.anchor_to == "z0" else (z - z0[idx]) / z0_std[idx]
            losses = losses + s.anchor * moved.square().mean((1, 2, 3))
        return losses, pred, moved

    if s.optim == "lbfgs":  # a line search spends its own evaluations per sample: one sample at a time
        parts = [_lbfgs(objective, z0[i : i + 1], i, s, on_step) for i in range(len(z0))]
        return Result(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Result)))
    zs = [z.detach().clone().requires_grad_(not gradfree) for z in z0]
    # A sample's loss is a mean over its pixels, so each element's gradient shrinks with the image: eps is divided
    # by the elements of a latent to mean the same at every size (Adam(k*g, eps) == Adam(g, eps/k)).
    opt = torch.optim.Adam(zs, lr=s.lr, betas=s.betas, eps=s.eps / z0[0].numel())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, max_steps, s.schedule, s.warmup_steps))
    channel_lr = None if s.channel_lr is None else torch.tensor(s.channel_lr, device=z0.device).view(-1, 1, 1)
    best = z0.detach().clone()
    cpu = torch.device("cpu")  # per-sample bookkeeping lives on the CPU, wherever the latents are
    best_loss = torch.full((n,), float("inf"), device=cpu)
    curves = torch.full((n, max_steps), float("nan"), device=cpu)
    steps = torch.zeros(n, dtype=torch.long, device=cpu)
    passes = torch.zeros(n, device=cpu)
    converged = torch.zeros(n, dtype=torch.bool, device=cpu)
    nonfinite = torch.zeros(n, dtype=torch.bool, device=cpu)
    active = list(range(n))
    history: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(n)]  # (latent, residual, gradient)
    # Step t evaluates the latents after t updates; the extra evaluation at t == max_steps scores
    # the last update without paying for a backward pass.
    for t in range(max_steps + 1):
        if not active:
            break
        opt.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(t < max_steps and not gradfree):
            losses, pred, moved = objective(torch.stack([zs[i] for i in active]), active)
        passes[active] += 0.5
        if t == 0:
            initial, shown = pred.detach().clone(), pred.detach().clone()  # shown: the decode of `best`
        values = losses.detach().float().cpu()
        going = []  # positions in `active` that take another update
        for j, i in enumerate(active):
            v = values[j]
            if t < max_steps:
                curves[i, t] = v
            if not torch.isfinite(v):
                nonfinite[i] = True
                zs[i].data.copy_(best[i])
            elif v < best_loss[i]:
                best_loss[i] = v
                best[i] = zs[i].detach()
                shown[i] = pred[j].detach()
            if nonfinite[i] or t == max_steps:
                continue
            if flat(curves[i], t, window, rel_tol):
                converged[i] = True
                continue
            going.append(j)
        steps[active] = t
        if going:
            passes[[active[j] for j in going]] += 0.5  # the backward, or gradient-free's encoder forward
            if not gradfree:
                losses[going].sum().backward()
                for j in set(range(len(active))) - set(going):
                    zs[active[j]].grad = None  # stopped samples must not take this update
            else:
                with torch.no_grad(), low_precision:
                    residual = encode(pred[going]).float() - z0[[active[j] for j in going]]
                for j, r in zip(going, residual):
                    zs[active[j]].grad = r
            if s.anderson and not gradfree:  # gradfree's steps are not the loss's gradient: not mixed (not measured)
                with torch.no_grad():  # the loss as a sum of squares (L2's; a model of the others): pixels, anchor
                    error = l2_residual(pred.detach(), target[active], None if weight is None else weight[active])
                    if s.anchor:
                        error = torch.cat([error, (s.anchor / z0[0].numel()) ** 0.5 * moved.detach().flatten(1)], 1)
                for j in going:
                    latent, h = zs[active[j]], history[active[j]]
                    h[:] = (h + [(latent.detach().clone(), error[j], latent.grad)])[-s.anderson:]
                    latent.data, latent.grad = mix(h)
            before = [zs[active[j]].detach().clone() for j in going] if channel_lr is not None else []
            opt.step()
            sched.step()
            for j, z in zip(going, before):  # each channel moves its multiple of Adam's step
                zs[active[j]].data = z + channel_lr * (zs[active[j]].detach() - z)
        active = [active[j] for j in going]
        if on_step and t < max_steps:
            finite = values[torch.isfinite(values)]
            on_step(t, len(active), float(finite.mean()) if len(finite) else float("nan"))
    return Result(best, curves[:, 0].clone(), best_loss, steps, passes, converged, nonfinite, curves, initial, shown)


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `k`."""

    @staticmethod
    def forward(ctx, x: Tensor, k: float) -> Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.k, None


def flat(curve: Tensor, t: int, window: int, rel_tol: float) -> bool:
    """The stopping rule: the loss at t changed by at most rel_tol (relative) since t - window."""
    return t >= window and bool(abs(curve[t - window] - curve[t]) <= rel_tol * abs(curve[t - window]))


class _Stop(Exception):
    """Ends one sample's L-BFGS run from inside its closure: budget spent, loss flat, or not finite."""


def _lbfgs(objective: Callable[[Tensor, list[int]], tuple[Tensor, Tensor, Tensor | None]], z0: Tensor, i: int,
           s: Settings, on_step: Callable[[int, int, float], None] | None) -> Result:
    """Sample i (z0: (1,C,h,w)) by torch.optim.LBFGS with a strong-Wolfe line search. Every evaluation the line search
    asks for is a pass; after max_steps of them one more, forward only, scores the last point. The rel_tol rule runs
    over evaluations. L-BFGS works on u with z = z0 + scale * u, scale = lr * elements: torch's first step is the
    gradient cut to L1 length 1, so in z each element moves by about lr on average, like Adam's first step. Later
    steps are quasi-Newton steps, which the scale does not change."""
    scale = s.lr * z0.numel()
    u = torch.zeros_like(z0, memory_format=torch.contiguous_format, requires_grad=True)  # LBFGS views its grad flat
    # the closure enforces the budget; max_iter only has to be out of its way (iterations <= evaluations)
    opt = torch.optim.LBFGS([u], lr=1.0, max_iter=10 * s.max_steps, tolerance_grad=0.0, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")
    curve = torch.full((1, s.max_steps), float("nan"), device="cpu")
    out = {"best": z0.detach().clone(), "loss": float("inf"), "converged": False, "nonfinite": False, "evals": 0,
           "passes": 0.0}

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
    return Result(out["best"], curve[:, 0].clone(), torch.tensor([out["loss"]], **cpu),
                  torch.tensor([opt.state[u].get("n_iter", 0)], **cpu), torch.tensor([out["passes"]], **cpu),
                  torch.tensor([out["converged"]], **cpu), torch.tensor([out["nonfinite"]], **cpu), curve,
                  out["initial"], out["shown"])


def mix(history: list[tuple[Tensor, Tensor, Tensor]], reg: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Anderson mixing of (latent, residual, gradient) triples: the affine combination (weights summing to 1) of
    the latents whose residuals combine to the smallest norm, and the same combination of their gradients. Exact
    where the residual is affine in the latent over the iterates (a least-squares loss through an affine decoder);
    `reg` (relative to the mean squared residual difference) keeps the weights tame where it is not."""
    z, r, g = history[-1]
    if len(history) < 2:
        return z.clone(), g  # a copy: the optimizer updates the latent in place, the history must keep it
    d = torch.stack([h[1].flatten() - r.flatten() for h in history[:-1]])  # (k-1, pixels)
    a = d @ d.T
    scale = a.trace() / len(a)
    if not torch.isfinite(scale) or scale <= 0:
        return z.clone(), g
    c = torch.linalg.solve(a + reg * scale * torch.eye(len(a), device=a.device), -(d @ r.flatten()))
    return (z + sum(ci * (h[0] - z) for ci, h in zip(c, history[:-1])),
            g + sum(ci * (h[2] - g) for ci, h in zip(c, history[:-1])))


def lr_factor(step: int, max_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then constant or cosine to 0."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ValueError(f"schedule={schedule}: must be one of {', '.join(SCHEDULES)}")
