"""A finished run scored against its images: metrics.csv, plots, grids, report.md and the means in
summary.json.

Reads each image's scores from its row (glo.method.fit scored the decodes it made); decodes with the
run's own VAE, against the run's own images (both rebuilt from metadata.json, unless the caller
hands them over), only the best, median and worst image for the grids, and every image for a metric
a row lacks (LPIPS, or rows from a glo before `ms_ssim_*` and `mae_*`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from glo import GloError
from glo.data.images import ImageDataset
from glo.latents import find_latents, load_latents
from glo.layout import GRIDS, METADATA, METRICS_CSV, SUMMARY
from glo.method.metrics import LOWER_IS_BETTER, METRICS
from glo.model.vae import FrozenVAE
from glo.report.render import grid_figure, save_figure, unit_hwc, write_plots, write_report
from glo.store.atomic import printable, save_json, save_text
from glo.store.summary import summarize


def lpips_metric() -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str | None]:
    """LPIPS when the `lpips` package and its backbone weights load; otherwise the reason it was
    skipped."""
    try:
        import lpips

        net = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception as e:  # ImportError (it needs torchvision), or no network for the weights
        return None, f"LPIPS skipped: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return (lambda a, b: net(a.clamp(-1, 1), b.clamp(-1, 1)).flatten()), None


def evaluate(
    run_dir: str | Path,
    vae: FrozenVAE | None = None,
    dataset: ImageDataset | None = None,
    batch_size: int = 8,
) -> dict:
    """Score a finished run against its images and write metrics.csv, the plots, the grids,
    report.md and summary.json; returns the summary."""
    run = Path(run_dir)
    arrays, metadata, vae, dataset = open_run(run, vae, dataset)
    metrics, skipped = dict(METRICS), []
    lp, why = lpips_metric()
    if lp:
        metrics["lpips"] = lp
    else:
        skipped.append(why)
    gain = arrays["psnr_final"] - arrays["psnr_initial"]
    values, rows = score(arrays, vae, dataset, metrics, gain, batch_size)
    write_metrics_csv(run / METRICS_CSV, arrays["ids"], metrics, values)

    summary = summarize(arrays)
    for m in metrics:
        before, after = values[f"{m}_initial"], values[f"{m}_final"]
        better = after < before if m in LOWER_IS_BETTER else after > before
        summary.update(
            {
                f"{m}_initial_mean": float(before.mean()),
                f"{m}_final_mean": float(after.mean()),
                f"{m}_initial_median": float(np.median(before)),
                f"{m}_final_median": float(np.median(after)),
                f"{m}_improved_fraction": float(better.mean()),
            }
        )
    summary["skipped_metrics"] = skipped
    upscaled = upscaling(arrays, metadata.get("image_size"))
    summary["images_upscaled"] = upscaled[0] if upscaled else 0
    save_json(run / SUMMARY, summary)

    images = write_plots(arrays, run)
    grids = grid_figure([rows[k] for k, _ in picks(gain)])
    images["grids"] = save_figure(grids, run / GRIDS)
    # the run's logger=none (or ~logger) asked for no event files
    if metadata["config"].get("logger"):
        with SummaryWriter(str(run)) as tb:
            for name, path in images.items():
                tb.add_image(
                    f"report/{name}", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC"
                )
    write_report(run, summary, images, metadata, skipped + ([upscaled[1]] if upscaled else []))
    return summary


def open_run(
    run: Path, vae: FrozenVAE | None, dataset: ImageDataset | None
) -> tuple[dict[str, np.ndarray], dict, FrozenVAE, ImageDataset]:
    """A run's rows and metadata, with its VAE and images rebuilt from metadata.json unless handed
    over; refused where the images are not those its latents were fitted to."""
    arrays = load_latents(find_latents(run))
    if not (run / METADATA).is_file():
        raise GloError(f"{run / METADATA}: no such file (is {run} a glo.run directory?)")
    metadata = json.loads((run / METADATA).read_text())
    cfg = OmegaConf.create(metadata["config"])
    vae = vae or instantiate(cfg.vae)
    dataset = dataset or instantiate(cfg.data, limit=None)
    index = set(dataset.ids)
    missing = [str(i) for i in arrays["ids"] if str(i) not in index]
    if missing:
        raise GloError(f"{find_latents(run)}: ids not in the run's data: {', '.join(missing[:5])}")
    now = dataset.digests()  # rows without `source_sha256` are not checked
    changed = [
        str(i) for i, h in zip(arrays["ids"], arrays.get("source_sha256", [])) if now[str(i)] != h
    ]
    if changed:  # its metrics would compare a latent with pixels it was not fitted to
        raise GloError(
            f"{find_latents(run)}: image '{changed[0]}' has changed since its latent was made "
            f"({len(changed)} in all); run the glo.run command that made {run} again to recompute "
            "them"
        )
    return arrays, metadata, vae, dataset


def picks(gain: np.ndarray) -> list[tuple[int, str]]:
    """The grid's rows, best first: the images of the largest, the median and the smallest PSNR
    gain."""
    order = np.argsort(gain, kind="stable")
    return list(
        {
            int(order[-1]): "best",
            int(order[len(order) // 2]): "median",
            int(order[0]): "worst",
        }.items()
    )


def score(
    arrays: dict[str, np.ndarray],
    vae: FrozenVAE,
    dataset: ImageDataset,
    metrics: dict[str, Callable[[Tensor, Tensor], Tensor]],
    gain: np.ndarray,
    batch_size: int,
) -> tuple[dict[str, np.ndarray], dict[int, dict]]:
    """Every metric per image (from the rows where they hold it; decoding every image only for one
    they lack), and the grid rows of the best, median and worst image."""
    shown = dict(picks(gain))
    stored = [m for m in metrics if f"{m}_final" in arrays]
    values = {
        f"{m}_{w}": arrays[f"{m}_{w}"].astype(np.float64)
        for m in stored
        for w in ("initial", "final")
    }
    rescore = [m for m in metrics if m not in stored]
    scores: dict[str, list[Tensor]] = {
        f"{m}_{w}": [] for m in rescore for w in ("initial", "final")
    }
    rows: dict[int, dict] = {}
    index = {name: i for i, name in enumerate(dataset.ids)}
    device = next(vae.parameters()).device
    todo = list(range(len(arrays["ids"]))) if rescore else sorted(shown)
    for start in range(0, len(todo), batch_size):
        part = todo[start : start + batch_size]
        x = torch.stack([dataset[index[str(arrays["ids"][k])]][0] for k in part]).to(device)
        with torch.no_grad():
            x0 = vae.decode(torch.from_numpy(arrays["initial_latents"][part]).to(device))
            x1 = vae.decode(torch.from_numpy(arrays["latents"][part]).to(device))
        for m in rescore:
            scores[f"{m}_initial"].append(metrics[m](x0, x).cpu())
            scores[f"{m}_final"].append(metrics[m](x1, x).cpu())
        for j, k in enumerate(part):
            if k in shown:
                title = f"{shown[k]}: {printable(str(arrays['ids'][k]))} ({gain[k]:+.2f} dB)"
                rows[k] = {
                    "title": title,
                    "input": unit_hwc(x[j]),
                    "initial": unit_hwc(x0[j]),
                    "optimized": unit_hwc(x1[j]),
                }
    values.update({k: torch.cat(v).numpy().astype(np.float64) for k, v in scores.items()})
    return values, rows


def write_metrics_csv(
    path: Path, ids: np.ndarray, metrics: dict, values: dict[str, np.ndarray]
) -> None:
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["id", *[f"{m}_{w}" for m in metrics for w in ("initial", "final", "gain")]])
    for i, name in enumerate(ids):
        writer.writerow(
            [
                name,
                *[
                    f"{v:.6g}"
                    for m in metrics
                    for v in (
                        values[f"{m}_initial"][i],
                        values[f"{m}_final"][i],
                        values[f"{m}_final"][i] - values[f"{m}_initial"][i],
                    )
                ],
            ]
        )
    save_text(path, table.getvalue())


def upscaling(arrays: dict[str, np.ndarray], size: int | None) -> tuple[int, str] | None:
    """How many images were smaller than the run's size, and a line saying so: their shorter side
    was enlarged to it, so a run's figures are those of interpolated pictures (BSDS500's 321 px at
    512 px, for one)."""
    if not size or "original_size" not in arrays:
        return None
    shorter = arrays["original_size"].min(1)
    small = shorter[shorter < size]
    if not len(small):
        return None
    return len(small), (
        f"{len(small)} of {len(shorter)} images were upscaled to {size} px from a shorter side of "
        f"{small.min()}" + (f"–{small.max()}" if small.max() > small.min() else "") + " px "
        "(`original_size`): interpolation adds no detail, so these are not the figures of photos "
        f"taken at {size} px"
    )
