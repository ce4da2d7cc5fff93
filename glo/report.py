"""Pictures and tables a researcher reads: plots, comparison grids, report.md, sweep comparison.

Everything here renders arrays that are already computed; nothing decodes or optimizes.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from glo import GloError  # noqa: E402
from glo.atomic import atomic_write, save_text  # noqa: E402


def save_figure(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def describe(m: dict) -> str:
    """The machine a figure was measured on (glo.hardware.machine()), in one line for its caption."""
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    bf16 = "native bf16" if m["cpu_native_bf16"] else "no native bf16"
    return f"{m['cpu']} ({m['cpu_capability']}, {bf16}), {m['cpus']} CPUs, {m['torch_threads']} torch threads{gpu}"


def measured_on(metadata: dict) -> str:
    """Each machine a run's figures were measured on (metadata.json), as one phrase: a run resumed elsewhere was
    timed on each. Empty where none was recorded."""
    found = [s["machine"] for s in metadata.get("sessions", []) if "machine" in s]
    found = found or ([metadata["machine"]] if "machine" in metadata else [])
    return "; and on ".join(dict.fromkeys(describe(m) for m in found))


def loss_curves_figure(curves: np.ndarray) -> Figure:
    """Median loss per step with the interquartile band; images that stopped drop out (NaN)."""
    fig, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    steps = np.arange(curves.shape[1])
    alive = ~np.isnan(curves).all(0)
    q25, q50, q75 = np.nanpercentile(curves[:, alive], [25, 50, 75], axis=0)
    ax.fill_between(steps[alive], q25, q75, alpha=0.3, label="interquartile")
    ax.plot(steps[alive], q50, label="median")
    ax.set(yscale="log", xlabel="step", ylabel="loss", title=f"loss over {len(curves)} images")
    ax.legend()
    return fig


def scatter_figure(before: np.ndarray, after: np.ndarray, name: str = "PSNR (dB)") -> Figure:
    fig, ax = plt.subplots(figsize=(4, 4), layout="constrained")
    ax.scatter(before, after, s=12)
    lo, hi = min(before.min(), after.min()), max(before.max(), after.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="no change")
    ax.set(xlabel=f"initial {name}", ylabel=f"optimized {name}", title=f"{name}: before vs after")
    ax.legend()
    return fig


def histogram_figure(values: np.ndarray, xlabel: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3), layout="constrained")
    ax.hist(values, bins=min(30, max(5, len(values) // 2)))
    ax.set(xlabel=xlabel, ylabel="images", title=title)
    return fig


def grid_figure(rows: list[dict[str, Any]]) -> Figure:
    """Per row: input | initial decode | optimized decode | both |error| maps on one shared colour scale.

    Each row dict holds `title` and HWC float images in [0,1]: `input`, `initial`, `optimized`.
    """
    fig, axes = plt.subplots(len(rows), 5, figsize=(15, 3.2 * len(rows)), squeeze=False, layout="constrained")
    for ax_row, row in zip(axes, rows):
        errors = [np.abs(row[k] - row["input"]).mean(2) for k in ("initial", "optimized")]
        vmax = max(float(np.percentile(np.concatenate([e.ravel() for e in errors]), 99.5)), 1e-6)
        panels = [row["input"], row["initial"], row["optimized"], *errors]
        names = ["input", "initial decode", "optimized decode", "|error| initial", "|error| optimized"]
        for ax, img, name in zip(ax_row, panels, names):
            shown = ax.imshow(img, cmap="magma", vmin=0, vmax=vmax) if img.ndim == 2 else ax.imshow(img)
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        ax_row[0].set_title(f"{row['title']}\ninput", fontsize=9)
        fig.colorbar(shown, ax=list(ax_row[3:]), fraction=0.025)
    return fig


def write_plots(arrays: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """The standard plots of a run, as PNG files in `out`."""
    gain = arrays["psnr_final"] - arrays["psnr_initial"]
    return {
        "loss_curves": save_figure(loss_curves_figure(arrays["loss_curves"]), out / "loss_curves.png"),
        "psnr_scatter": save_figure(scatter_figure(arrays["psnr_initial"], arrays["psnr_final"]),
                                    out / "psnr_scatter.png"),
        "psnr_gain": save_figure(histogram_figure(gain, "PSNR gain (dB)", "gain per image"), out / "psnr_gain.png"),
        "steps": save_figure(histogram_figure(arrays["steps"], "steps", "steps per image"), out / "steps.png"),
        **({"gain_vs_drift": save_figure(gain_drift_figure(gain, arrays["drift_distance"]), out / "gain_vs_drift.png")}
           if "drift_distance" in arrays else {}),
    }


def gain_drift_figure(gain: np.ndarray, distance: np.ndarray) -> Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3.5), layout="constrained")
    ax.scatter(distance, gain, s=12)
    ax.set(xlabel="drift ||z - z0|| / ||z0||", ylabel="PSNR gain (dB)", title="gain against drift, per image")
    return fig


def drift_rows(summary: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """report.md's drift table: each channel's pooled mean and std, encoder's against optimized, then the
    per-image means of the other drift measures (glo.drift)."""
    rows = [{"measure": f"channel {c} mean / std", "encoder": f"{m0:.3f} / {s0:.3f}",
             "optimized": f"{m1:.3f} / {s1:.3f}", "ratio": f"std x{s1 / s0:.2f}" if s0 > 0 else "—"}
            for c, (m0, s0, m1, s1) in enumerate(zip(*(summary[f"{prefix}channel_{k}_{w}"]
                                                       for w in ("initial", "final") for k in ("mean", "std"))))]
    for name, key in (("high-frequency power share", "hf_share"),
                      ("re-encode error ||E(D(z)) - z|| / ||z||", "reencode_error")):
        before, after = summary[f"{prefix}{key}_initial_mean"], summary[f"{prefix}{key}_final_mean"]
        rows.append({"measure": name, "encoder": f"{before:.4f}", "optimized": f"{after:.4f}",
                     "ratio": f"x{after / before:.2f}" if before > 0 else "—"})
    rows.append({"measure": "distance ||z - z0|| / ||z0||", "encoder": "0", "optimized":
                 f"{summary[f'{prefix}drift_distance_mean']:.4f}", "ratio": "—"})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    # a bare | in a cell (a norm, ||z||) would start a new column
    fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", r"\|")
    lines = ["| " + " | ".join(map(fmt, keys)) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def write_report(out: Path, summary: dict[str, Any], images: dict[str, Path], metadata: dict, notes: list[str]) -> Path:
    """report.md: the numbers, the pictures, the machine and the config that made them, readable on its own."""
    metrics = [k[: -len("_initial_mean")] for k in summary  # image quality; drift has its own table
               if k.endswith("_initial_mean") and "hf_share" not in k and "reencode_error" not in k]
    quality = [{"metric": m, "initial mean": summary[f"{m}_initial_mean"], "optimized mean": summary[f"{m}_final_mean"],
                "initial median": summary.get(f"{m}_initial_median", float("nan")),
                "optimized median": summary.get(f"{m}_final_median", float("nan")),
                "fraction improved": summary.get(f"{m}_improved_fraction", float("nan"))} for m in metrics]
    precision = metadata.get("precision", {})
    run = [{"num_images": summary["num_images"], "steps_mean": summary["steps_mean"],
            "passes_mean": summary.get("passes_mean", float("nan")), "converged": summary["converged"],
            "nonfinite": summary["nonfinite"], "seconds_total": summary["seconds_total"],
            "images_per_second": summary["images_per_second"], "precision": precision.get("used", "—")}]
    machines = measured_on(metadata)
    where = f"Measured on {machines}" if machines else ""
    if where and "reason" in precision:
        where += f"; decoder precision {precision['used']} ({precision['reason']})"
    passes = f"{summary['passes_mean']:.1f} decoder passes, " if "passes_mean" in summary else ""
    text = [
        f"# glo run report: {out.name}", "",
        f"{summary['num_images']} images; mean PSNR {summary['psnr_initial_mean']:.2f} → "
        f"{summary['psnr_final_mean']:.2f} dB ({summary['psnr_gain_mean']:+.2f} dB); "
        f"{summary['images_improved']} images improved; {passes}{summary['steps_mean']:.1f} steps on average.", "",
        "## Quality", "", markdown_table(quality), "", "## Run", "", markdown_table(run), "",
        *([f"{where}.", ""] if where else []),
        *(["## Drift from the encoder's latents", "",
           "How far the optimized latents lie from what the encoder produces, the distribution a diffusion UNet "
           "was trained on (glo.drift; scaled SD units).", "", markdown_table(drift_rows(summary)), ""]
          if "drift_distance_mean" in summary else []),
        *(["### The masked-image latents (inpainting conditioning)", "",
           markdown_table(drift_rows(summary, "masked_")), ""]
          if "masked_drift_distance_mean" in summary else []),
        *(["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []),
        "## Plots", "", *[f"![{name}]({p.name})" for name, p in images.items()], "",
        "## Config", "", "```json", json.dumps(metadata.get("config", {}), indent=2), "```", "",
    ]
    path = out / "report.md"
    save_text(path, "\n".join(text))
    return path


SUMMARY_NEEDED = ("psnr_gain_mean", "psnr_final_mean", "ssim_final_mean", "ssim_initial_mean", "steps_mean",
                  "images_per_second")


def compare(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job of a Hydra multirun directory, best mean PSNR gain first, written to compare.md
    (with the machine the jobs' speeds were measured on: a column where they differ) and compare.csv."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise GloError(f"{sweep}: no such directory")
    rows, left_out = [], []
    for job in sorted({p.parent for p in (*sweep.glob("*/summary.json"), *sweep.glob("*/.hydra"))}):
        summary_file = job / "summary.json"
        try:
            s = json.loads(summary_file.read_text())
            missing = [k for k in SUMMARY_NEEDED if k not in s]
            if missing:
                raise ValueError(f"no '{missing[0]}'")
        except FileNotFoundError:
            left_out.append(f"{job.name} (not finished: no summary.json)")
            continue
        except (OSError, ValueError) as e:
            left_out.append(f"{job.name} (summary.json unreadable: {e})")
            continue
        meta_file = job / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = [line[2:].strip() for line in overrides_file.read_text().splitlines() if line.startswith("- ")] \
            if overrides_file.is_file() else []
        rows.append({"job": job.name, "overrides": " ".join(overrides), "psnr_gain_mean": s["psnr_gain_mean"],
                     "psnr_final_mean": s["psnr_final_mean"],
                     "ssim_gain_mean": s["ssim_final_mean"] - s["ssim_initial_mean"],
                     "steps_mean": s["steps_mean"], "passes_mean": s.get("passes_mean", float("nan")),
                     "images_per_second": s["images_per_second"],
                     "precision": meta.get("precision", {}).get("used", "—"),
                     "machine": measured_on(meta) or "—"})
    if not rows:
        raise GloError(f"{sweep}: no finished jobs (no readable */summary.json)"
                       + (f"; left out: {', '.join(left_out)}" if left_out else ""))
    rows.sort(key=lambda r: r["psnr_gain_mean"], reverse=True)
    machines = {r["machine"] for r in rows}
    one = machines.pop() if len(machines) == 1 else None  # then a line says it, rather than a column
    shown = rows if one is None else [{k: v for k, v in r.items() if k != "machine"} for r in rows]
    text = markdown_table(shown) + "\n" + (f"\nMeasured on {one}.\n" if one not in (None, "—") else "")
    text += f"\nLeft out: {', '.join(left_out)}.\n" if left_out else ""
    save_text(sweep / "compare.md", text)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(sweep / "compare.csv", table.getvalue())
    return rows
