"""Image grids for TensorBoard, shared by glo.run's module and VAE training: input, decodes and
error side by side.

Tensors in [-1,1] in, a (3,H,W) image in [0,1] out, which is what `SummaryWriter.add_image` takes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def error_map(pred: Tensor, target: Tensor) -> Tensor:
    """|pred - target| averaged over colour, x4 so small errors show, as a grey image in [-1,1] (no
    error: black; 0.5 or more: white)."""
    return ((pred - target).abs().mean(1, keepdim=True) * 4 - 1).clamp(max=1).expand_as(target)


def comparison_grid(panels: list[Tensor], rows: int = 4) -> Tensor:
    """(3,H*rows,W*len(panels)) in [0,1]: the first `rows` images of each panel side by side, one
    row each."""
    grid = torch.cat([p[:rows].detach().float().clamp(-1, 1).cpu() for p in panels], dim=3)
    return (torch.cat(list(grid), dim=1) + 1) / 2
