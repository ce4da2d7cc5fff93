"""One batch, start to end, in plain PyTorch: encode, optimize through the frozen decoder, decode,
score.

glo.run's LightningModule, glo.bench and glo.roundtrip all call this, so they measure the same
thing. With hole masks, each image also gets its inpainting twin: the latent of the masked image
(hole set to 0, i.e. grey, as diffusers does), optimized in the same engine run (on the known pixels
only if `known_only`) and exported with the mask at latent resolution. Every latent also gets its
drift from the encoder's (glo.method.drift), which costs two encoder passes per latent (the
re-encode of the initial and of the optimized decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from glo.layout import DRIFT_STATS
from glo.method.drift import drift
from glo.method.engine import optimize
from glo.method.metrics import METRICS, region_psnr
from glo.method.samples import Result
from glo.method.settings import Settings
from glo.model.vae import FrozenVAE


def fit(
    vae: FrozenVAE,
    target: Tensor,
    s: Settings,
    loss: Callable[..., Tensor],
    weight: Tensor | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[Tensor, Result, Tensor, Tensor]:
    """The encoder's latents of `target`, the engine's result, and the fp32 decodes of both."""
    z0, z0_std = vae.posterior(target)
    with torch.enable_grad():  # Lightning predicts under no_grad; the latents need gradients
        r = optimize(
            vae.decode,
            z0,
            target,
            loss,
            s,
            weight=weight,
            encode=vae.encode,
            z0_std=z0_std,
            on_step=on_step,
        )
    if s.precision == "fp32":  # the engine already decoded both: a pass saved
        return z0, r, r.initial_decoded, r.decoded
    with torch.no_grad():  # a reduced-precision decode is not what the metrics should measure
        return z0, r, vae.decode(z0), vae.decode(r.latents)


@dataclass
class Fitted:
    arrays: dict[str, np.ndarray]  # one row per image: everything glo exports about it
    initial: Tensor  # (B,3,H,W) decode of the encoder's latent
    final: Tensor  # (B,3,H,W) decode of the optimized latent


def fit_batch(
    vae: FrozenVAE,
    x: Tensor,
    settings: Settings,
    loss: Callable[..., Tensor],
    holes: Tensor | None = None,
    known_only: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Fitted:
    """Images x (B,3,H,W) in [-1,1], optional holes (B,1,H,W) with 1 = hole -> latents and their
    metrics."""
    n, target, weight = len(x), x, None
    if holes is not None:
        known = 1 - holes
        target = torch.cat([x, x * known])  # full images, then the masked ones
        if known_only:  # the full image keeps every pixel; the masked image only its known ones
            weight = torch.cat([torch.ones_like(known), known])
    z0, r, decoded0, decoded1 = fit(vae, target, settings, loss, weight, on_step)
    initial, final = decoded0[:n], decoded1[:n]  # the full images' decodes, without the masked ones
    out = {
        "latents": r.latents[:n].float().cpu().numpy(),
        "initial_latents": z0[:n].float().cpu().numpy(),
        "steps": r.steps[:n].numpy(),
        "passes": r.passes[:n].numpy(),
        "initial_loss": r.initial_loss[:n].numpy(),
        "final_loss": r.final_loss[:n].numpy(),
        **{
            f"{m}_{w}": score(decoded, x).cpu().numpy()
            for m, score in METRICS.items()
            for w, decoded in (("initial", initial), ("final", final))
        },
        "converged": r.converged[:n].numpy(),
        "nonfinite": r.nonfinite[:n].numpy(),
        "loss_curves": r.loss_curves[:n].numpy(),
    }
    # as images
    reencoded0, reencoded1 = vae.encode(decoded0.clamp(-1, 1)), vae.encode(decoded1.clamp(-1, 1))
    for prefix, part in (("", slice(None, n)), ("masked_", slice(n, None)))[
        : 1 if holes is None else 2
    ]:
        before, after = (
            drift(z0[part], z0[part], reencoded0[part]),
            drift(r.latents[part], z0[part], reencoded1[part]),
        )
        out[f"{prefix}drift_distance"] = after["drift_distance"].cpu().numpy()
        for k in DRIFT_STATS:
            out[f"{prefix}{k}_initial"], out[f"{prefix}{k}_final"] = (
                before[k].cpu().numpy(),
                after[k].cpu().numpy(),
            )
    if holes is not None:
        out.update(
            {
                "masks": holes[:, 0].bool().cpu().numpy(),
                "latent_masks": latent_mask(holes).float().cpu().numpy(),
                "masked_latents": r.latents[n:].float().cpu().numpy(),
                "initial_masked_latents": z0[n:].float().cpu().numpy(),
                "masked_steps": r.steps[n:].numpy(),
                "masked_passes": r.passes[n:].numpy(),
                "psnr_known_initial": region_psnr(decoded0[n:], x, known).cpu().numpy(),
                "psnr_known_final": region_psnr(decoded1[n:], x, known).cpu().numpy(),
            }
        )
    return Fitted(out, initial, final)


def latent_mask(mask: Tensor, factor: int = 8) -> Tensor:
    """(B,1,H,W) pixel hole mask -> (B,1,H/8,W/8) by max-pooling: any latent cell the hole touches
    is a hole.

    diffusers' pipeline resizes with nearest-neighbour instead, which can mark a cell known although
    part of its 8x8 pixels is hole; max-pooling never lets the UNet treat hole content as known.
    """
    return torch.nn.functional.max_pool2d(mask, factor)
