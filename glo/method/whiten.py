"""coords=whitened: Adam on each latent's coordinates along the principal directions of its own
channel covariance, in units of its spread there, so every step is measured against the spread the
encoder gave that direction. Any rotation or rescaling of a VAE's latent channels then leaves the
result as it is, and a direction the encoder barely varies (two channels that move together) is
moved as little, relative to its spread, as any other."""

from __future__ import annotations

import torch
from torch import Tensor


def principal_basis(z0: Tensor) -> Tensor:
    """(B,C,h,w) -> (B,C,C) maps M with z = M u: the eigenvectors of each latent's channel
    covariance over its cells, each scaled by its std. A direction with no spread keeps a millionth
    of the largest one's, so M inverts."""
    cells = z0.float().flatten(2)
    cells = cells - cells.mean(2, keepdim=True)
    variance, vectors = torch.linalg.eigh(cells @ cells.transpose(1, 2) / cells.shape[2])
    floor = (1e-6 * variance.amax(1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
    return vectors * variance.clamp_min(floor).sqrt()[:, None, :]


def to_latent(basis: Tensor, u: Tensor) -> Tensor:
    """Coordinates u (B,C,h,w) in `basis` (B,C,C) -> latents z = M u, cell by cell."""
    return torch.einsum("bij,bjhw->bihw", basis, u)


def to_coords(basis: Tensor, z: Tensor) -> Tensor:
    """Latents z -> their coordinates u in `basis`: u = M^-1 z."""
    return torch.linalg.solve(basis, z.flatten(2)).view_as(z)
