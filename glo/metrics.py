"""Image quality per sample, via torchmetrics, on images in [-1,1] (clamped: metrics see what a viewer sees)."""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _unit(x: Tensor) -> Tensor:
    return ((x.detach().float().clamp(-1, 1) + 1) / 2)


@torch.no_grad()
def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) PSNR in dB for data range 1; identical images give +inf."""
    return peak_signal_noise_ratio(_unit(pred), _unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3))


@torch.no_grad()
def ssim(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) SSIM with the standard 11-px Gaussian window."""
    return structural_similarity_index_measure(_unit(pred), _unit(target), data_range=1.0, reduction="none")
