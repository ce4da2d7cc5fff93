"""python -m glo.compare SWEEP_DIR: a table of a multirun's jobs, best mean PSNR gain first."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from glo import GloError
from glo.app.cli import one_line_errors
from glo.app.typed import Parser, Schema, parsed
from glo.layout import METADATA, SUMMARY
from glo.report.render import markdown_table, measured_on
from glo.store.atomic import save_text

SUMMARY_NEEDED = (
    "psnr_gain_mean",
    "psnr_final_mean",
    "ssim_final_mean",
    "ssim_initial_mean",
    "steps_mean",
    "images_per_second",
)


def compare(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job of a Hydra multirun directory, best mean PSNR gain first, written to
    compare.md (with the machine the jobs' speeds were measured on: a column where they differ) and
    compare.csv."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise GloError(f"{sweep}: no such directory")
    rows, left_out = [], []
    for job in sorted({p.parent for p in (*sweep.glob("*/summary.json"), *sweep.glob("*/.hydra"))}):
        summary_file = job / SUMMARY
        if (job / "error.txt").is_file():
            left_out.append(f"{job.name} (failed: {(job / 'error.txt').read_text().strip()})")
            continue
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
        meta_file = job / METADATA
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = (
            [
                line[2:].strip()
                for line in overrides_file.read_text().splitlines()
                if line.startswith("- ")
            ]
            if overrides_file.is_file()
            else []
        )
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(overrides),
                "psnr_gain_mean": s["psnr_gain_mean"],
                "psnr_final_mean": s["psnr_final_mean"],
                "ssim_gain_mean": s["ssim_final_mean"] - s["ssim_initial_mean"],
                "steps_mean": s["steps_mean"],
                "passes_mean": s.get("passes_mean", float("nan")),
                "images_per_second": s["images_per_second"],
                "precision": meta.get("precision", {}).get("used", "—"),
                "machine": measured_on(meta) or "—",
            }
        )
    if not rows:
        raise GloError(
            f"{sweep}: no finished jobs (no readable */summary.json)"
            + (f"; left out: {', '.join(left_out)}" if left_out else "")
        )
    rows.sort(key=lambda r: r["psnr_gain_mean"], reverse=True)
    machines = {r["machine"] for r in rows}
    # then a line says it, rather than a column
    one = machines.pop() if len(machines) == 1 else None
    shown = rows if one is None else [{k: v for k, v in r.items() if k != "machine"} for r in rows]
    text = markdown_table(shown) + "\n"
    text += f"\nMeasured on {one}.\n" if one not in (None, "—") else ""
    text += f"\nLeft out: {', '.join(left_out)}.\n" if left_out else ""
    save_text(sweep / "compare.md", text)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(sweep / "compare.csv", table.getvalue())
    return rows


class Compare(Schema):
    sweep_dir: str


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m glo.compare", description=__doc__.splitlines()[0])
    p.add_argument(
        "sweep_dir", help="a Hydra multirun directory (experiments/multirun/<date_time>)"
    )
    args = parsed(Compare, p, argv)
    with one_line_errors("glo.compare"):
        compare(args.sweep_dir)
    print((Path(args.sweep_dir) / "compare.md").read_text())
    print(f"written: {Path(args.sweep_dir) / 'compare.md'}, {Path(args.sweep_dir) / 'compare.csv'}")


if __name__ == "__main__":
    main()
