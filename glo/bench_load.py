"""python -m glo.bench_load: many small images through glo.run with sharded export; peak memory must
not grow.

Generates N images per size in a temporary folder, runs `python -m glo.run` on them (tiny VAE, both
export formats), checks every image was exported exactly once, and records each run's peak RSS
(from the child's own rusage). Writes bench_load.json and bench_load.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import numpy as np
from PIL import Image
from pydantic import Field

from glo.app.typed import Count, Parser, Publish, Schema, parsed
from glo.latents import find_latents, load_latents
from glo.layout import LATENTS
from glo.model.hardware import machine
from glo.report.render import markdown_table, publish
from glo.store.atomic import save_json, save_text


def make_images(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"img{i:06d}.png"
        )


def run_once(images: Path, out: Path, fmt: str, size: int, batch_size: int) -> dict:
    args = [
        sys.executable,
        "-m",
        "glo.run",
        "vae=tiny_random",
        "data=folder",
        f"data.path={images}",
        f"data.size={size}",
        "max_steps=2",
        f"batch_size={batch_size}",
        f"export.format={fmt}",
        "report=false",
        "image_every_n_batches=0",
        f"hydra.run.dir={out}",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"glo.run failed: {proc.stderr.read()[-2000:]}")
    ids = load_latents(find_latents(out))["ids"]
    return {
        "format": fmt,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "seconds": seconds,
        "exported": len(ids),
        "unique": len(set(ids)),
    }


class BenchLoad(Schema):
    counts: list[Count]
    size: Annotated[int, Field(ge=16, multiple_of=8)]
    batch_size: Count
    out: str
    publish: Publish


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m glo.bench_load", description=__doc__.splitlines()[0])
    p.add_argument(
        "--counts", nargs="+", default=[100, 1000], help="images per run (default: 100 1000)"
    )
    p.add_argument(
        "--size", default=32, help="image side in pixels, a multiple of 8 from 16 (default: 32)"
    )
    p.add_argument("--batch-size", default=50)
    p.add_argument("--out", default=f"experiments/bench_load/{datetime.now():%Y-%m-%d_%H-%M-%S}")
    p.add_argument(
        "--publish",
        metavar="FILE",
        help="a Markdown file (docs/figures.md): the table replaces its "
        "section glo.bench_load, under the command, the machine and the date",
    )
    args = parsed(BenchLoad, p, argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            make_images(Path(tmp) / f"images{n}", n, args.size)
            for fmt in LATENTS:  # each export format
                row = {
                    "images": n,
                    **run_once(
                        Path(tmp) / f"images{n}",
                        Path(tmp) / f"run{n}{fmt}",
                        fmt,
                        args.size,
                        args.batch_size,
                    ),
                }
                rows.append(row)
                print(markdown_table([row]), flush=True)
    growth = {
        fmt: max(
            r["peak_rss_mb"] for r in rows if r["format"] == fmt and r["images"] == max(args.counts)
        )
        / max(
            r["peak_rss_mb"] for r in rows if r["format"] == fmt and r["images"] == min(args.counts)
        )
        for fmt in LATENTS
    }
    result = {
        "date": datetime.now(timezone.utc).isoformat(),
        "size": args.size,
        "rows": rows,
        "peak_growth_largest_over_smallest": growth,
    }
    save_json(out / "bench_load.json", result)
    body = f"{markdown_table(rows)}\n\nPeak RSS, largest over smallest run: " + ", ".join(
        f"{fmt} {g:.2f}×" for fmt, g in growth.items()
    )
    save_text(out / "bench_load.md", f"# glo.bench_load — {result['date'][:10]}\n\n{body}\n")
    if args.publish:
        command = " ".join(
            [
                "python -m glo.bench_load",
                "--counts",
                *map(str, args.counts),
                "--size",
                str(args.size),
                "--batch-size",
                str(args.batch_size),
            ]
        )
        publish(Path(args.publish), "glo.bench_load", command, machine(), result["date"], body)
    print(f"glo.bench_load: {out / 'bench_load.md'}")


if __name__ == "__main__":
    main()
