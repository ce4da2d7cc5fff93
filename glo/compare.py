"""python -m glo.compare SWEEP_DIR: a table of a multirun's jobs, best mean PSNR gain first."""
from __future__ import annotations

import argparse
from pathlib import Path

from glo.cli import one_line_errors
from glo.report import compare


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m glo.compare", description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="a Hydra multirun directory (experiments/multirun/<date_time>)")
    args = p.parse_args(argv)
    with one_line_errors("glo.compare"):
        compare(args.sweep_dir)
    print((Path(args.sweep_dir) / "compare.md").read_text())
    print(f"written: {Path(args.sweep_dir) / 'compare.md'}, {Path(args.sweep_dir) / 'compare.csv'}")


if __name__ == "__main__":
    main()
