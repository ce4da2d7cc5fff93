"""Image quality per sample, via torchmetrics, on images in [-1,1] (clamped: metrics see what a
viewer sees).

Each function maps (B,3,H,W) pairs to (B,). PSNR of identical images is +inf, and is kept so.
torchmetrics is imported where it scores, not with this module: it takes seconds, and tools refuse a
typo before they score.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from glo.method.losses import weighted_mean

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the standard five scales


def _unit(x: Tensor) -> Tensor:
    return (x.detach().float().clamp(-1, 1) + 1) / 2


@torch.no_grad()
def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB for data range 1."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        _unit(pred), _unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


@torch.no_grad()
def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM with the standard 11-px Gaussian window."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        _unit(pred), _unit(target), data_range=1.0, reduction="none"
    )


@torch.no_grad()
def ms_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """MS-SSIM with as many of the five standard scales as the image size allows (all five from 161
    px)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    scales = sum(1 for k in range(len(MS_SSIM_BETAS)) if min(pred.shape[-2:]) > 10 * 2**k)
    return multiscale_structural_similarity_index_measure(
        _unit(pred), _unit(target), data_range=1.0, reduction="none", betas=MS_SSIM_BETAS[:scales]
    )


@torch.no_grad()
def mae(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error in [0,1] units."""
    return (_unit(pred) - _unit(target)).abs().flatten(1).mean(1)


@torch.no_grad()
def region_psnr(pred: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """PSNR in dB over the pixels where region (B,1,H,W) > 0 (the known region an inpainting pass
    must keep, its hole, a seam band); NaN for an image whose region is empty (an all-hole mask's
    known region)."""
    mse = weighted_mean((_unit(pred) - _unit(target)).square(), region)
    return torch.where(region.flatten(1).gt(0).any(1), 10 * torch.log10(1 / mse), float("nan"))


@torch.no_grad()
def region_ssim(pred: Tensor, target: Tensor, region: Tensor) -> Tensor:
    """SSIM (11-px Gaussian window) averaged over the pixels where region (B,1,H,W) > 0; NaN where
    it is empty. Each pixel's SSIM looks at its window, so pixels next to the region's edge also see
    what lies beyond it."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(
        _unit(pred), _unit(target), data_range=1.0, reduction="none", return_full_image=True
    )
    return torch.where(
        region.flatten(1).gt(0).any(1), weighted_mean(full, region.float()), float("nan")
    )


def seam_band(hole: Tensor, width: int) -> Tensor:
    """(B,1,H,W) bool: the known pixels within `width` pixels (Chebyshev) of the hole, where an
    inpainted hole meets the kept image and pasted-back pixels show their edge."""
    near = torch.nn.functional.max_pool2d(hole.float(), 2 * width + 1, stride=1, padding=width) > 0
    return near & ~hole.bool()


# What every exported row carries, before and after (fit scores them on the decodes it already has,
# so a report decodes nothing again); LOWER_IS_BETTER says which way improves
METRICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "psnr": psnr,
    "ssim": ssim,
    "ms_ssim": ms_ssim,
    "mae": mae,
}
LOWER_IS_BETTER = {"mae", "lpips"}
