"""python -m glo.roundtrip: how the pixels a user keeps drift over repeated encode -> decode passes.

Every inpainting pass re-encodes the whole image, so the region outside the mask goes through the
lossy VAE again and again. Each trip here saves the decoded image as 8 bits (what the user's file
holds) and encodes that again. The `plain` chain decodes the encoder's latent; the `glo` chain
decodes a latent optimized with glo.run's settings (on the known pixels when `mask.known_only`).
Both are scored against the original image after every trip, on the known region and on the whole
image. Writes roundtrip.json, roundtrip.md and roundtrip.png into the run directory.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import hydra
import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader

from glo import GloError
from glo.app.cli import command_line, hydra_main, one_line_errors
from glo.app.config import Run, absolute_paths, load_model, validate
from glo.app.typed import Count, Publish
from glo.data.masks import batch_holes
from glo.data.pixels import to_8bit
from glo.method.fit import fit
from glo.method.losses import PixelLoss
from glo.method.metrics import psnr, region_psnr
from glo.method.settings import Settings
from glo.model.hardware import machine, resolve_precision
from glo.model.vae import FrozenVAE
from glo.report.render import markdown_table, publish, save_figure
from glo.store.atomic import save_json, save_text

SCORES = ("plain_known", "glo_known", "plain_whole", "glo_whole")


def chains(
    vae: FrozenVAE,
    loss: PixelLoss,
    settings: Settings,
    x: Tensor,
    known: Tensor,
    known_only: bool,
    trips: int,
) -> dict[str, Tensor]:
    """(trips, B) PSNR after each trip, of the known region and of the whole image, for both
    chains."""
    plain, ours = x, x
    scores: dict[str, list[Tensor]] = {k: [] for k in SCORES}
    for _ in range(trips):
        with torch.no_grad():
            plain = to_8bit(vae.decode(vae.encode(plain)))
        ours = to_8bit(fit(vae, ours, settings, loss, weight=known if known_only else None)[3])
        for name, y in (("plain", plain), ("glo", ours)):
            scores[f"{name}_known"].append(region_psnr(y, x, known).cpu())
            scores[f"{name}_whole"].append(psnr(y, x).cpu())
    return {k: torch.stack(v) for k, v in scores.items()}


class RoundTrip(Run):
    """conf/roundtrip.yaml, typed: glo.run's settings and the trips."""

    trips: Count
    report_at: Annotated[list[Count], Field(min_length=1)]
    publish: Publish


def roundtrip(cfg: DictConfig, out: Path) -> dict:
    settings, speed = validate(cfg, RoundTrip)
    absolute_paths(cfg)
    if not all(k <= cfg.trips for k in cfg.report_at):
        trips = cfg.trips
        fits = sorted({k for k in cfg.report_at if 1 <= k <= trips} | {trips})
        raise GloError(
            f"trips={cfg.trips}, report_at={list(cfg.report_at)}: every k of report_at must be <= "
            f"trips (e.g. trips={trips} 'report_at={fits}')"
        )
    torch.manual_seed(cfg.seed)
    dataset = instantiate(cfg.data)
    masks = instantiate(cfg.mask)
    if masks is None:
        raise GloError("mask=none: the round trip needs a mask (mask=boxes|strokes|folder)")
    masks.check(dataset.originals())
    vae, loss = load_model(cfg, speed), instantiate(cfg.loss)
    settings = settings.replace(precision=resolve_precision(cfg.precision, vae.device)[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in SCORES}
    ids: list[str] = []
    for images, meta in DataLoader(dataset, batch_size=cfg.batch_size):
        x = images.to(vae.device)
        known = 1 - batch_holes(masks, meta, x.shape[-1]).to(x)
        for k, v in chains(vae, loss, settings, x, known, masks.known_only, cfg.trips).items():
            parts[k].append(v)
        ids += list(meta["id"])
        print(f"glo.roundtrip: {len(ids)}/{len(dataset)} images", flush=True)
    # (trips, images)
    scores = {k: torch.cat(v, 1).numpy().astype(np.float64) for k, v in parts.items()}
    rows = [
        {
            "trips": k,
            **{f"{s}_psnr": float(scores[s][k - 1].mean()) for s in SCORES},
            "known_gain_db": float(
                (scores["glo_known"][k - 1] - scores["plain_known"][k - 1]).mean()
            ),
            "known_min_gain_db": float(
                (scores["glo_known"][k - 1] - scores["plain_known"][k - 1]).min()
            ),
        }
        for k in cfg.report_at
    ]
    result = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "vae": vae.info(),
        "ids": ids,
        "rows": rows,
        "per_trip": {k: v.tolist() for k, v in scores.items()},
    }
    save_json(out / "roundtrip.json", result)
    save_figure(figure(scores), out / "roundtrip.png")
    body = "\n".join(
        [
            f"{len(ids)} images, VAE `{vae.name}`, mask "
            f"`{HydraConfig.get().runtime.choices.mask}`, {cfg.data.size} px. PSNR (dB) against "
            "the original after k encode -> decode trips, each saved as 8 bits. `known` = the "
            "pixels outside the mask; `plain` = the encoder's latent; `glo` = the optimized "
            f"latent{' fitted to the known pixels only' if masks.known_only else ''} "
            f"({cfg.max_steps} steps max, lr {cfg.lr}).",
            "",
            markdown_table(rows),
        ]
    )
    save_text(
        out / "roundtrip.md",
        f"# glo.roundtrip\n\n{body}\n\n![PSNR against round trips](roundtrip.png)\n",
    )
    if cfg.publish:
        publish(
            Path(cfg.publish),
            "glo.roundtrip",
            command_line("glo.roundtrip"),
            machine(),
            datetime.now(timezone.utc).isoformat(),
            body,
        )
    return result


def figure(scores: dict[str, np.ndarray]):
    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    k = np.arange(1, len(scores["plain_known"]) + 1)
    for name, style in (
        ("plain_known", "C0-"),
        ("glo_known", "C1-"),
        ("plain_whole", "C0--"),
        ("glo_whole", "C1--"),
    ):
        ax.plot(k, scores[name].mean(1), style, marker="o", ms=3, label=name.replace("_", ", "))
    ax.set(
        xlabel="round trips", ylabel="mean PSNR (dB)", title="Drift over repeated encode -> decode"
    )
    ax.legend()
    return fig


@hydra.main(version_base="1.3", config_path="../conf", config_name="roundtrip")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.roundtrip"):
        out = Path(HydraConfig.get().runtime.output_dir)
        result = roundtrip(cfg, out)
        last = result["rows"][-1]
        print(
            f"glo.roundtrip: after {last['trips']} trips, known region "
            f"{last['plain_known_psnr']:.2f} dB plain vs {last['glo_known_psnr']:.2f} dB glo "
            f"({last['known_gain_db']:+.2f} dB) -> {out / 'roundtrip.md'}"
        )


if __name__ == "__main__":
    hydra_main(main)
