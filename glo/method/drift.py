"""How far latents drift from the encoder's: the distribution a diffusion UNet was trained on.

A latent that decodes to a sharper image but lies far from what the encoder produces may help the
pixels and hurt the diffusion model. Per image (all in SD latent units):
- `drift_distance`: ||z - z0|| / ||z0||, relative distance to the encoder's latent z0;
- `channel_mean`, `channel_std` (per channel): pooled over a run they compare with the encoder's;
- `channel_moment` (C,C): the mean of z z^T over the latent's cells; pooled over a run it gives the
  channel covariance, and `spread_ratio` the largest std ratio along any direction of channel space,
  not only along each channel (a VAE whose channels are mixed by a rotation has the same spread
  ratio);
- `hf_share`: share of the latent's power (per channel, mean removed) at radial frequencies above
  half the Nyquist frequency, i.e. above 0.25 cycles per latent cell; fine dot patterns raise it;
- `reencode_error`: ||E(D(z)) - z|| / ||z||, how far z is from what the encoder says of its own
  decode.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

HALF_NYQUIST = 0.25  # cycles per latent cell


def _norm(z: Tensor) -> Tensor:
    return z.float().flatten(1).norm(dim=1)


def high_frequency_share(z: Tensor) -> Tensor:
    """(B,C,h,w) -> (B,): power above half the Nyquist frequency over all power, the channel means
    removed."""
    z = z.float() - z.float().mean((2, 3), keepdim=True)
    power = torch.fft.fft2(z).abs().square().sum(1)  # (B,h,w), summed over channels
    fy, fx = (
        torch.fft.fftfreq(z.shape[2], device=z.device),
        torch.fft.fftfreq(z.shape[3], device=z.device),
    )
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > HALF_NYQUIST
    total = power.flatten(1).sum(1)
    return torch.where(total > 0, (power * high).flatten(1).sum(1) / total, torch.zeros_like(total))


@torch.no_grad()
def drift(z: Tensor, z0: Tensor, reencoded: Tensor) -> dict[str, Tensor]:
    """Per-image drift of latents z (B,C,h,w) from the encoder's z0, given reencoded = E(D(z))."""
    z, z0 = z.float(), z0.float()
    return {
        "drift_distance": _norm(z - z0) / _norm(z0),
        "hf_share": high_frequency_share(z),
        "channel_mean": z.mean((2, 3)),
        "channel_std": z.std((2, 3), unbiased=False),
        "channel_moment": (lambda f: f @ f.transpose(1, 2) / f.shape[2])(z.flatten(2)),
        "reencode_error": _norm(reencoded.float() - z) / _norm(z),
    }


def pooled_channel_stats(means: np.ndarray, stds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std over every element of a run, from each image's (N,C) means and stds
    (all images have the same latent size, so each weighs the same)."""
    mean = means.mean(0)
    return mean, np.sqrt(np.maximum((stds**2 + means**2).mean(0) - mean**2, 0))


def pooled_covariance(means: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """The (C,C) channel covariance over every element of a run, from each image's (N,C) means and
    (N,C,C) moments (each image weighs the same: all have the same latent size)."""
    mean = means.mean(0)
    return moments.mean(0) - np.outer(mean, mean)


def spread_ratio(cov: np.ndarray, cov0: np.ndarray) -> float:
    """The largest std ratio of `cov` to the encoder's `cov0` along any direction of channel space:
    whitened by cov0, the square root of the largest eigenvalue. 1 where the spreads agree; a
    rotation of the channels changes nothing. inf where the encoder's latents have no spread in some
    direction."""
    try:
        w = np.linalg.inv(np.linalg.cholesky(cov0.astype(np.float64)))
    except np.linalg.LinAlgError:
        return float("inf")
    return float(np.sqrt(max(np.linalg.eigvalsh(w @ cov @ w.T).max(), 0.0)))
