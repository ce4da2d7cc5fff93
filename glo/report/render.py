"""Pictures and tables a researcher reads: plots, comparison grids, report.md.

Everything here renders arrays that are already computed; nothing decodes or optimizes.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from glo.layout import REPORT_MD  # noqa: E402
from glo.store.atomic import atomic_write, save_text  # noqa: E402

if TYPE_CHECKING:
    from torch import Tensor

ROOT = Path(os.path.abspath(__file__)).parents[2]  # the project: glo/report/render.py


def unit_hwc(x: Tensor) -> np.ndarray:
    """One image tensor in [-1, 1], CHW, as the HWC array in [0, 1] that matplotlib and Pillow
    take."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def save_figure(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def describe(m: dict) -> str:
    """The machine a figure was measured on (glo.model.hardware.machine()), in one line for its
    caption."""
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    bf16 = "native bf16" if m["cpu_native_bf16"] else "no native bf16"
    threads = f"{m['cpus']} CPUs, {m['torch_threads']} torch threads"
    return f"{m['cpu']} ({m['cpu_capability']}, {bf16}), {threads}{gpu}"


def publish(path: Path, section: str, command: str, machine: dict, date: str, body: str) -> None:
    """Put a measuring tool's tables into a shared Markdown file (docs/figures.md) as its section
    `section`, under one header line: the `command` that reproduces them (paths as a reader can
    follow them), the machine, the date. The file's other sections stay, so each figure in it is as
    its tool last wrote it."""
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    header = f"`{reproducible(command)}` — {describe(machine)}, {date[:10]}"
    block = f"{start}\n{header}\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Figures\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    save_text(path, text)


def project_path(path: str | Path) -> str:
    """`path` as a reader of a published table can follow it: relative to the project (or beside it,
    as ../shared/data is), else only its name; never a directory of the machine that ran the
    tool."""
    path = Path(os.path.abspath(path))  # links kept: ../shared may be one
    return os.path.relpath(path, ROOT) if path.is_relative_to(ROOT.parent) else path.name


def reproducible(command: str) -> str:
    """A command line with each absolute path in a `key=value` made a project path."""

    def relative(m: re.Match) -> str:
        quote = m.group(2)
        return f"{m.group(1)}{quote}{project_path(m.group(3))}{quote}"

    return re.sub(r"(\S+=)(['\"]?)(/[^\s'\"]*)\2", relative, command)


def measured_on(metadata: dict) -> str:
    """Each machine a run's figures were measured on (metadata.json), as one phrase: a run resumed
    elsewhere was timed on each. Empty where none was recorded."""
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


def grid_figure(
    rows: list[dict[str, Any]], labels: tuple[str, str] = ("initial decode", "optimized decode")
) -> Figure:
    """Per row: input | mask, where a row has one | two outputs (`initial`, `optimized`, named by
    `labels`) | both |error| maps on one shared colour scale.

    Each row dict holds `title` and HWC float images in [0,1]: `input`, `initial`, `optimized` and
    maybe `mask`.
    """
    shown_first = ["input", *(["mask"] if "mask" in rows[0] else []), "initial", "optimized"]
    names = [
        "input",
        *(["mask"] if "mask" in rows[0] else []),
        *labels,
        *(f"|error| {k}" for k in labels),
    ]
    fig, axes = plt.subplots(
        len(rows),
        len(names),
        figsize=(3 * len(names), 3.2 * len(rows)),
        squeeze=False,
        layout="constrained",
    )
    for ax_row, row in zip(axes, rows):
        errors = [np.abs(row[k] - row["input"]).mean(2) for k in ("initial", "optimized")]
        vmax = max(float(np.percentile(np.concatenate([e.ravel() for e in errors]), 99.5)), 1e-6)
        for ax, img, name in zip(ax_row, [row[k] for k in shown_first] + errors, names):
            shown = (
                ax.imshow(img, cmap="magma", vmin=0, vmax=vmax) if img.ndim == 2 else ax.imshow(img)
            )
            ax.set_title(name, fontsize=9)
            ax.axis("off")
        ax_row[0].set_title(f"{row['title']}\ninput", fontsize=9)
        fig.colorbar(shown, ax=list(ax_row[-2:]), fraction=0.025)
    return fig


def write_plots(arrays: dict[str, np.ndarray], out: Path) -> dict[str, Path]:
    """The standard plots of a run (glo.layout.PLOTS), as PNG files in `out`."""
    gain = arrays["psnr_final"] - arrays["psnr_initial"]
    figures = {
        "loss_curves": lambda: loss_curves_figure(arrays["loss_curves"]),
        "psnr_scatter": lambda: scatter_figure(arrays["psnr_initial"], arrays["psnr_final"]),
        "psnr_gain": lambda: histogram_figure(gain, "PSNR gain (dB)", "gain per image"),
        "steps": lambda: histogram_figure(arrays["steps"], "steps", "steps per image"),
        "gain_vs_drift": lambda: gain_drift_figure(gain, arrays["drift_distance"]),
    }
    if "drift_distance" not in arrays:
        del figures["gain_vs_drift"]
    return {name: save_figure(figures[name](), out / f"{name}.png") for name in figures}


def gain_drift_figure(gain: np.ndarray, distance: np.ndarray) -> Figure:
    fig, ax = plt.subplots(figsize=(4.5, 3.5), layout="constrained")
    ax.scatter(distance, gain, s=12)
    ax.set(
        xlabel="drift ||z - z0|| / ||z0||",
        ylabel="PSNR gain (dB)",
        title="gain against drift, per image",
    )
    return fig


def drift_rows(summary: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """report.md's drift table: each channel's pooled mean and std, encoder's against optimized,
    then the per-image means of the other drift measures (glo.method.drift)."""
    rows = [
        {
            "measure": f"channel {c} mean / std",
            "encoder": f"{m0:.3f} / {s0:.3f}",
            "optimized": f"{m1:.3f} / {s1:.3f}",
            "ratio": f"std x{s1 / s0:.2f}" if s0 > 0 else "—",
        }
        for c, (m0, s0, m1, s1) in enumerate(
            zip(
                *(
                    summary[f"{prefix}channel_{k}_{w}"]
                    for w in ("initial", "final")
                    for k in ("mean", "std")
                )
            )
        )
    ]
    for name, key in (
        ("high-frequency power share", "hf_share"),
        ("re-encode error ||E(D(z)) - z|| / ||z||", "reencode_error"),
    ):
        before, after = summary[f"{prefix}{key}_initial_mean"], summary[f"{prefix}{key}_final_mean"]
        rows.append(
            {
                "measure": name,
                "encoder": f"{before:.4f}",
                "optimized": f"{after:.4f}",
                "ratio": f"x{after / before:.2f}" if before > 0 else "—",
            }
        )
    if f"{prefix}spread_ratio_max" in summary:
        rows.append(
            {
                "measure": "largest std ratio along any direction of channel space",
                "encoder": "1",
                "optimized": f"{summary[f'{prefix}spread_ratio_max']:.3f}",
                "ratio": "—",
            }
        )
    rows.append(
        {
            "measure": "distance ||z - z0|| / ||z0||",
            "encoder": "0",
            "optimized": f"{summary[f'{prefix}drift_distance_mean']:.4f}",
            "ratio": "—",
        }
    )
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    # a bare | in a cell (a norm, ||z||) would start a new column
    fmt = lambda v: (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", r"\|")
    lines = ["| " + " | ".join(map(fmt, keys)) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def write_report(
    out: Path, summary: dict[str, Any], images: dict[str, Path], metadata: dict, notes: list[str]
) -> Path:
    """report.md: the numbers, the pictures, the machine and the config that made them, readable on
    its own."""
    metrics = [
        k[: -len("_initial_mean")]
        for k in summary  # image quality; drift has its own table
        if k.endswith("_initial_mean") and "hf_share" not in k and "reencode_error" not in k
    ]
    quality = [
        {
            "metric": m,
            "initial mean": summary[f"{m}_initial_mean"],
            "optimized mean": summary[f"{m}_final_mean"],
            "initial median": summary.get(f"{m}_initial_median", float("nan")),
            "optimized median": summary.get(f"{m}_final_median", float("nan")),
            "fraction improved": summary.get(f"{m}_improved_fraction", float("nan")),
        }
        for m in metrics
    ]
    precision = metadata.get("precision", {})
    run = [
        {
            "num_images": summary["num_images"],
            "steps_mean": summary["steps_mean"],
            "passes_mean": summary.get("passes_mean", float("nan")),
            "converged": summary["converged"],
            "nonfinite": summary["nonfinite"],
            "seconds_total": summary["seconds_total"],
            "images_per_second": summary["images_per_second"],
            "precision": precision.get("used", "—"),
        }
    ]
    machines = measured_on(metadata)
    where = f"Measured on {machines}" if machines else ""
    if where and "reason" in precision:
        where += f"; decoder precision {precision['used']} ({precision['reason']})"
    passes = f"{summary['passes_mean']:.1f} decoder passes, " if "passes_mean" in summary else ""
    text = [
        f"# glo run report: {out.name}",
        "",
        f"{summary['num_images']} images; mean PSNR {summary['psnr_initial_mean']:.2f} → "
        f"{summary['psnr_final_mean']:.2f} dB ({summary['psnr_gain_mean']:+.2f} dB); "
        f"{summary['images_improved']} images improved; {passes}{summary['steps_mean']:.1f} steps "
        "on average.",
        "",
        "## Quality",
        "",
        markdown_table(quality),
        "",
        "## Run",
        "",
        markdown_table(run),
        "",
        *([f"{where}.", ""] if where else []),
        *(
            [
                "## Drift from the encoder's latents",
                "",
                "How far the optimized latents lie from what the encoder produces, the "
                "distribution a diffusion UNet was trained on (glo.method.drift; scaled SD "
                "units).",
                "",
                markdown_table(drift_rows(summary)),
                "",
            ]
            if "drift_distance_mean" in summary
            else []
        ),
        *(
            [
                "### The masked-image latents (inpainting conditioning)",
                "",
                markdown_table(drift_rows(summary, "masked_")),
                "",
            ]
            if "masked_drift_distance_mean" in summary
            else []
        ),
        *(["## Notes", "", *[f"- {n}" for n in notes], ""] if notes else []),
        "## Plots",
        "",
        *[f"![{name}]({p.name})" for name, p in images.items()],
        "",
        "## Config",
        "",
        "```json",
        json.dumps(metadata.get("config", {}), indent=2),
        "```",
        "",
    ]
    path = out / REPORT_MD
    save_text(path, "\n".join(text))
    return path
