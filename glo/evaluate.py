"""python -m glo.evaluate RUN_DIR: per-image quality before vs after, plots, grids and report.md
(glo.report.evaluation)."""

from __future__ import annotations

from pathlib import Path

from glo.app.cli import one_line_errors
from glo.app.typed import Count, Parser, Schema, parsed
from glo.report.evaluation import evaluate


class Evaluate(Schema):
    run_dir: str
    batch_size: Count


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m glo.evaluate", description=__doc__.splitlines()[0])
    p.add_argument(
        "run_dir", help="a glo.run output directory (holds latents.npz and metadata.json)"
    )
    p.add_argument("--batch-size", default=8)
    args = parsed(Evaluate, p, argv)
    with one_line_errors("glo.evaluate"):
        s = evaluate(args.run_dir, batch_size=args.batch_size)
    print(
        f"glo.evaluate: PSNR {s['psnr_initial_mean']:.2f} -> {s['psnr_final_mean']:.2f} dB, SSIM "
        f"{s['ssim_initial_mean']:.3f} -> {s['ssim_final_mean']:.3f}; report: "
        f"{Path(args.run_dir) / 'report.md'}"
    )


if __name__ == "__main__":
    main()
