"""summary.json: the headline figures of a latent dataset, from its exported rows alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from glo.method.drift import pooled_channel_stats, pooled_covariance, spread_ratio


def summarize(a: dict[str, np.ndarray]) -> dict[str, float | int]:
    """The headline figures of a latent dataset, from its arrays alone."""
    gain = a["psnr_final"] - a["psnr_initial"]
    seconds = float(a["seconds"].sum())
    # Ranks of a DDP run work at once: the run took as long as its busiest rank, not the sum of all
    # of them.
    ranks = a["rank"] if "rank" in a else np.zeros(len(a["ids"]), int)
    wall = max((float(a["seconds"][ranks == r].sum()) for r in np.unique(ranks)), default=0.0)
    return {
        "num_images": int(len(a["ids"])),
        "psnr_initial_mean": float(a["psnr_initial"].mean()),
        "psnr_final_mean": float(a["psnr_final"].mean()),
        "psnr_gain_mean": float(gain.mean()),
        "ssim_initial_mean": float(a["ssim_initial"].mean()),
        "ssim_final_mean": float(a["ssim_final"].mean()),
        "images_improved": int((gain > 0).sum()),
        "steps_mean": float(a["steps"].mean()),
        **({"passes_mean": float(a["passes"].mean())} if "passes" in a else {}),
        "converged": int(a["converged"].sum()),
        "nonfinite": int(a["nonfinite"].sum()),
        "seconds_total": seconds,
        "images_per_second": len(a["ids"]) / wall if wall > 0 else float("nan"),
        **{
            k: v
            for prefix in ("", "masked_")
            if f"{prefix}drift_distance" in a
            for k, v in drift_summary(a, prefix).items()
        },
        **(known_summary(a) if "psnr_known_final" in a else {}),
    }


def known_summary(a: dict[str, np.ndarray]) -> dict[str, float | int]:
    """The masked-image latents' PSNR on the known pixels, in the same figures report.md gives every
    metric, over the images that have known pixels (an all-hole mask's PSNR is NaN, and counted
    apart)."""
    scored = ~np.isnan(a["psnr_known_final"])
    before, after = a["psnr_known_initial"][scored], a["psnr_known_final"][scored]
    improved = after > before

    def of(f: Any, x: np.ndarray) -> float:
        return float(f(x)) if len(x) else float("nan")

    return {
        "psnr_known_initial_mean": of(np.mean, before),
        "psnr_known_final_mean": of(np.mean, after),
        "psnr_known_initial_median": of(np.median, before),
        "psnr_known_final_median": of(np.median, after),
        "psnr_known_improved_fraction": of(np.mean, improved),
        "known_images_improved": int(improved.sum()),
        "images_without_known_pixels": int((~scored).sum()),
    }


def drift_summary(a: dict[str, np.ndarray], prefix: str = "") -> dict[str, float | list[float]]:
    """Drift of a run's latents from the encoder's (glo.method.drift): means per image, channel
    statistics pooled."""
    out: dict[str, float | list[float]] = {
        f"{prefix}drift_distance_mean": float(a[f"{prefix}drift_distance"].mean())
    }
    for w in ("initial", "final"):
        out[f"{prefix}hf_share_{w}_mean"] = float(a[f"{prefix}hf_share_{w}"].mean())
        out[f"{prefix}reencode_error_{w}_mean"] = float(a[f"{prefix}reencode_error_{w}"].mean())
        mean, std = pooled_channel_stats(
            a[f"{prefix}channel_mean_{w}"], a[f"{prefix}channel_std_{w}"]
        )
        out[f"{prefix}channel_mean_{w}"], out[f"{prefix}channel_std_{w}"] = (
            mean.tolist(),
            std.tolist(),
        )
    # a latents file without it gives the per-channel figures only
    if f"{prefix}channel_moment_final" in a:
        cov = {
            w: pooled_covariance(a[f"{prefix}channel_mean_{w}"], a[f"{prefix}channel_moment_{w}"])
            for w in ("initial", "final")
        }
        out[f"{prefix}spread_ratio_max"] = spread_ratio(cov["final"], cov["initial"])
    return out
