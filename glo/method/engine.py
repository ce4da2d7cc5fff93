"""The algorithm: fit each image's latent through the frozen decoder with Adam (or L-BFGS).

Each sample's latent is its own leaf tensor. Every step decodes only the *active* latents, stacked,
and backpropagates the sum of their per-sample losses. A sample leaves the active set when its loss
stops changing (relative change over `window` steps at most `rel_tol`) or when the budget of
`max_steps` updates is spent. Adam skips parameters whose `.grad` is None, so stopped samples keep
their state and each keeps its own step count. Every sample keeps the best latent it has seen, so
the result is never worse than the start, and a non-finite loss sends that sample back to its best
latent instead of ending the batch. With `anderson` > 0, each update starts from the mix of the
sample's recent latents that fits the target best where the decoder is affine (Anderson
acceleration, glo.method.anderson): more gain per decoder pass. optim=lbfgs runs torch's L-BFGS
instead, one sample at a time (glo.method.lbfgs). Plain PyTorch: no Lightning, no disk.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace
from typing import Callable

import torch
from torch import Tensor

from glo import GloError
from glo.method.anderson import anderson
from glo.method.lbfgs import lbfgs
from glo.method.samples import Result, Samples
from glo.method.settings import Settings
from glo.method.whiten import principal_basis, to_coords, to_latent
from glo.model.hardware import PRECISIONS

# A per-pixel mean's gradient, ~2 * error / pixels, underflows fp16 at SD sizes. In fp16 it crosses
# the decoder multiplied by this (a power of two, so exact; GradScaler's start) and is divided back
# before it reaches the latents. bf16 has fp32's range and needs no scaling.
FP16_GRAD_SCALE = 2.0**16
Objective = Callable[[Tensor, list[int]], tuple[Tensor, Tensor, Tensor | None]]


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
    """Optimize latents z (B,C,h,w) so that loss_fn(decode(z), target[, weight]) -> (B,) falls,
    sample by sample.

    weight: (B,1,H,W) per-pixel loss weights (e.g. an inpainting mask's known region), passed to
    loss_fn. encode: the encoder, needed by optim=gradfree (Hong et al., NeurIPS 2024): Adam follows
    E(D(z)) - E(x) instead of the back-propagated gradient, so no backward pass runs; z0 must be
    E(x). z0_std: the encoder's posterior std (like z0), needed by anchor_to=posterior. The decoder
    runs in s.precision (fp32, bf16 or fp16: the caller resolves auto); latents, Adam and the loss
    stay fp32.
    """
    gradfree = s.optim == "gradfree"
    check(s, z0, encode, z0_std)
    basis = principal_basis(z0) if s.coords == "whitened" else None
    objective, low_precision = make_objective(decode, z0, target, loss_fn, s, weight, z0_std, basis)
    # Adam moves the coordinates u of z = M u; Result: latents
    z0 = z0 if basis is None else to_coords(basis, z0)
    if s.optim == "lbfgs":
        parts = [lbfgs(objective, z0[i : i + 1], i, s, on_step) for i in range(len(z0))]
        return Result(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Result)))
    zs = [z.detach().clone().requires_grad_(not gradfree) for z in z0]
    opt, sched = adam(zs, s)
    channel_lr = (
        None
        if s.channel_lr is None
        else torch.tensor(s.channel_lr, device=z0.device).view(-1, 1, 1)
    )
    book = Samples(z0, s.max_steps, s.window, s.rel_tol)
    # (latent, residual, gradient)
    history: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in z0]
    active = list(range(len(z0)))
    # t: the latents after t updates; t == max_steps scores the last, forward only
    for t in range(s.max_steps + 1):
        if not active:
            break
        opt.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(t < s.max_steps and not gradfree):
            losses, pred, moved = objective(torch.stack([zs[i] for i in active]), active)
        values = losses.detach().float().cpu()
        going = book.record(t, active, values, pred, zs)
        if going:
            # the backward, or gradient-free's encoder forward
            book.passes[[active[j] for j in going]] += 0.5
            if gradfree:
                # Adam follows E(D(z)) - E(x): no backward pass
                with torch.no_grad(), low_precision:
                    for j, r in zip(
                        going, encode(pred[going]).float() - z0[[active[j] for j in going]]
                    ):
                        zs[active[j]].grad = r
            else:
                backward(zs, losses, active, going)
                # gradfree's steps are not the loss's gradient: not mixed (not measured)
                if s.anderson:
                    anderson(
                        zs,
                        history,
                        active,
                        going,
                        pred,
                        target,
                        weight,
                        moved,
                        s.anchor,
                        z0[0].numel(),
                        s.anderson,
                    )
            adam_step(
                opt, sched, zs, [active[j] for j in going], channel_lr, s.eps if t == 0 else None
            )
        active = [active[j] for j in going]
        if on_step and t < s.max_steps:
            finite = values[torch.isfinite(values)]
            on_step(t, len(active), float(finite.mean()) if len(finite) else float("nan"))
    return (
        book.result()
        if basis is None
        else replace(book.result(), latents=to_latent(basis, book.best))
    )


def backward(zs: list[Tensor], losses: Tensor, active: list[int], going: list[int]) -> None:
    """The gradients of the samples still going; the stopped ones get none, so they take no
    update."""
    losses[going].sum().backward()
    for j in set(range(len(active))) - set(going):
        zs[active[j]].grad = None


def check(s: Settings, z0: Tensor, encode: Callable | None, z0_std: Tensor | None) -> None:
    """What the settings ask of the caller's arguments."""
    if s.optim == "gradfree" and encode is None:
        raise ValueError("optim=gradfree needs the encoder")
    if s.anchor and s.anchor_to == "posterior" and z0_std is None:
        raise GloError(
            "anchor_to=posterior: this VAE's encoder is deterministic (no posterior std); use "
            "anchor_to=z0"
        )
    # each tool resolves auto once, for its device, and records what it chose
    if s.precision not in PRECISIONS:
        raise ValueError(
            f"precision={s.precision}: the engine runs at one of {', '.join(PRECISIONS)}; resolve "
            "auto with glo.model.hardware.resolve_precision first"
        )
    if s.channel_lr is not None and len(s.channel_lr) != z0.shape[1]:
        raise GloError(
            f"channel_lr={list(s.channel_lr)}: has {len(s.channel_lr)} values, but this VAE's "
            f"latents have {z0.shape[1]} channels"
        )


def make_objective(
    decode: Callable[[Tensor], Tensor],
    z0: Tensor,
    target: Tensor,
    loss_fn: Callable[..., Tensor],
    s: Settings,
    weight: Tensor | None,
    z0_std: Tensor | None,
    basis: Tensor | None = None,
) -> tuple[Objective, torch.autocast]:
    """The per-sample loss of latents z (the samples idx; with a basis, their coordinates in it),
    with their decodes in fp32 and the anchor's displacement; and the decoder's autocast, which
    s.precision sets."""
    autocast = PRECISIONS[s.precision]
    low_precision = torch.autocast(
        z0.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None
    )
    grad_scale = FP16_GRAD_SCALE if autocast is torch.float16 else 1.0
    if z0_std is not None:
        # each image's weights 1 / std^2 average 1: the shape of the encoder's doubt, not its size,
        # so one `anchor` pulls as hard as anchor_to=z0 at any image size, batch or VAE
        z0_std = z0_std * z0_std.pow(-2).mean((1, 2, 3), keepdim=True).sqrt()

    def objective(z: Tensor, idx: list[int]) -> tuple[Tensor, Tensor, Tensor | None]:
        z = z if basis is None else to_latent(basis[idx], z)
        with low_precision:
            pred = decode(_ScaleGrad.apply(z, 1 / grad_scale)).float()
        pred = _ScaleGrad.apply(pred, grad_scale)
        losses = (
            loss_fn(pred, target[idx])
            if weight is None
            else loss_fn(pred, target[idx], weight[idx])
        )
        moved = None
        if s.anchor:
            moved = z - z0[idx] if s.anchor_to == "z0" else (z - z0[idx]) / z0_std[idx]
            losses = losses + s.anchor * moved.square().mean((1, 2, 3))
        return losses, pred, moved

    return objective, low_precision


def adam(
    zs: list[Tensor], s: Settings
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """One Adam over every sample's latent, each in its own group so that each gets its own eps
    (adam_step), with the learning-rate schedule."""
    opt = torch.optim.Adam([{"params": [z]} for z in zs], lr=s.lr, betas=s.betas, eps=s.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: lr_factor(t, s.max_steps, s.schedule, s.warmup_steps)
    )


def adam_step(
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    zs: list[Tensor],
    idx: list[int],
    channel_lr: Tensor | None,
    first_eps: float | None,
) -> None:
    """One Adam update of the latents zs[idx], which have a gradient; with channel_lr, each channel
    moves its multiple of Adam's step. At the first step (first_eps), each sample's eps becomes
    first_eps times the RMS of its first gradient: Adam(k*g, k*eps) == Adam(g, eps), so the result
    does not depend on the loss's scale (a decoder's gain, L1 or L2, the image size, how far the
    image is from its reconstruction), and elements whose gradient is well below the image's typical
    one barely move."""
    moving = [zs[i] for i in idx]
    for i in idx if first_eps is not None else ():
        rms = float(zs[i].grad.detach().float().square().mean().sqrt())
        # all-zero: no step
        opt.param_groups[i]["eps"] = first_eps * max(rms, torch.finfo(torch.float32).tiny)
    before = [z.detach().clone() for z in moving] if channel_lr is not None else []
    opt.step()
    sched.step()
    for z, b in zip(moving, before):
        z.data = b + channel_lr * (z.detach() - b)


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `k`."""

    @staticmethod
    def forward(ctx, x: Tensor, k: float) -> Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.k, None


def lr_factor(step: int, max_steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then constant or cosine to
    0."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, max_steps) / max_steps))
    raise ValueError(f"schedule={schedule}: must be constant or cosine")
