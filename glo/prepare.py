"""python -m glo.prepare: resize and centre-crop a split of images once, so runs load small uint8
arrays.

Writes `<out>/<split>/images/<id>.npz` (uint8 image + its meta) and `<out>/<split>/stats.json`. The
split is built beside its final place and swapped in whole, so a folder prepared before (other
images, another size) never leaves files behind that a run would read with the new ones.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from glo import GloError
from glo.app.cli import one_line_errors
from glo.app.typed import Parser, Schema, parsed
from glo.data.images import FolderDataset, image_files, subfolders
from glo.data.pixels import check_size
from glo.store.atomic import save_json, save_npz


def prepare(src: str, out: str, split: str, size: int) -> dict:
    """`src/<split>` if it exists (a BSDS500 root), else `src` itself is the folder of images."""
    check_size(size, "--size")
    root = Path(src)
    folder = root / split if (root / split).is_dir() else root
    if folder == root and root.is_dir() and not image_files(root) and (splits := subfolders(root)):
        # a dataset root without this split: the mistake is --split, not --src
        raise GloError(
            f"--src {src}: no '{split}' subfolder and no images of its own; pass --split one of "
            f"{splits}"
        )
    dataset = FolderDataset(str(folder), size=size, key="--src")
    final = Path(out) / split
    if final.exists() and not (
        final.is_dir() and {p.name for p in final.iterdir()} <= {"images", "stats.json"}
    ):
        raise GloError(
            f"--out {out}: {final} exists and is not a glo.prepare split (it holds other files); "
            "pass another --out"
        )
    build = final.with_name(f".{split}.{os.getpid()}.tmp")
    shutil.rmtree(build, ignore_errors=True)
    try:
        build.mkdir(parents=True)
    except OSError as e:
        raise GloError(
            f"--out {out}: cannot create a folder there ({e.strerror}); pass another --out"
        ) from None
    try:
        stats = _write(dataset, build, folder, split, size)
        # swapped out first, removed after: at every moment one whole split is in place
        if final.exists():
            old = final.with_name(f".{split}.{os.getpid()}.old")
            final.rename(old)
            build.rename(final)
            shutil.rmtree(old)
        else:
            build.rename(final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return stats


def _write(dataset: FolderDataset, dest_root: Path, folder: Path, split: str, size: int) -> dict:
    dest = dest_root / "images"
    pixels = np.zeros((2, 3))  # running sum and sum of squares per channel, in [0,1]
    originals = []
    for i in range(len(dataset)):
        img, meta = dataset.image(i)
        array = np.asarray(img)
        save_npz(dest / f"{meta['id']}.npz", {"image": array, "meta": np.array(json.dumps(meta))})
        unit = array.reshape(-1, 3) / 255.0
        pixels += [unit.mean(0), (unit**2).mean(0)]
        originals.append([meta["height"], meta["width"]])
    mean = pixels[0] / len(dataset)
    stats = {
        "split": split,
        "source": str(folder.resolve()),
        "count": len(dataset),
        "size": size,
        # a flat channel's variance can round below 0, and its root would be NaN
        "channel_mean": mean.tolist(),
        "channel_std": np.sqrt(np.maximum(pixels[1] / len(dataset) - mean**2, 0)).tolist(),
        "original_sizes": {
            f"{h}x{w}": originals.count([h, w]) for h, w in sorted({tuple(o) for o in originals})
        },
    }
    save_json(dest_root / "stats.json", stats)
    return stats


class Prepare(Schema):
    src: str | None
    out: str
    split: str
    size: int  # checked with its hint by check_size


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m glo.prepare", description=__doc__.splitlines()[0])
    p.add_argument(
        "--src",
        default=os.environ.get("BSDS500_PATH"),
        help="image folder, or a BSDS500 root holding train/ val/ test/ (default: $BSDS500_PATH)",
    )
    p.add_argument("--out", default="processed_data", help="output root (default: processed_data)")
    p.add_argument(
        "--split", default="train", help="split name, and sub-folder of --src if it has one"
    )
    p.add_argument(
        "--size", default=256, help="output side in pixels, a multiple of 8 (default: 256)"
    )
    args = parsed(Prepare, p, argv)
    with one_line_errors("glo.prepare"):
        if not args.src:
            raise GloError("no source folder: pass --src DIR or set BSDS500_PATH")
        stats = prepare(args.src, args.out, args.split, args.size)
    images = Path(args.out) / args.split / "images"
    print(f"glo.prepare: {stats['count']} images -> {images} at {args.size}x{args.size}")


if __name__ == "__main__":
    main()
