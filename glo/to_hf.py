"""python -m glo.to_hf RUN_DIR [OUT]: a run's latents as a Hugging Face dataset, for diffusers'
training scripts.

A converter rather than an export format: it works on any finished run (NPZ or HDF5) without
rerunning it, and keeps `datasets` out of the optimization path. Every per-image array becomes a
column with its exact dtype; latents, masks and the inpainting conditioning are fixed-shape array
features. Rows stream from the lazily read latents file into Arrow `WRITER_BATCH` at a time, so a
dataset larger than memory converts. OUT (default RUN_DIR/hf) is written under a temporary name and
renamed; `datasets.load_from_disk(OUT)` reads it, and glo's metadata.json and summary.json are
copied in.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from glo import GloError
from glo.app.cli import one_line_errors
from glo.app.typed import Parser, Schema, parsed
from glo.latents import damaged, find_latents, open_latents
from glo.layout import METADATA, SUMMARY
from glo.store.atomic import printable

WRITER_BATCH = 64


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise GloError("python -m glo.to_hf needs the 'hf' extra: pip install -e '.[hf]'") from None
    return datasets


def features(arrays: dict[str, Any]) -> Any:
    """The datasets.Features of a latents file: one column per array, the row shape and dtype
    kept."""
    datasets = _import_datasets()
    out = {}
    for key, a in arrays.items():
        dtype = "string" if a.dtype.kind in "OUS" else ("bool" if a.dtype == bool else str(a.dtype))
        shape = tuple(a.shape[1:])
        if not shape:
            out[key] = datasets.Value(dtype)
        elif len(shape) == 1:
            out[key] = datasets.Sequence(datasets.Value(dtype), length=shape[0])
        else:
            array = {2: datasets.Array2D, 3: datasets.Array3D, 4: datasets.Array4D}[len(shape)]
            out[key] = array(shape=shape, dtype=dtype)
    return datasets.Features(out)


def rows(path: str, chunk: int = WRITER_BATCH) -> Iterator[dict[str, Any]]:
    """One dict per image, read `chunk` rows at a time from the lazily opened latents file."""
    arrays = open_latents(path)
    for start in range(0, len(arrays["ids"]), chunk):
        try:
            part = {k: np.asarray(v[start : start + chunk]) for k, v in arrays.items()}
        except OSError as e:
            raise damaged(Path(path), e) from None
        for i in range(len(part["ids"])):
            yield {
                k: (
                    printable(v[i].decode("utf-8", "surrogateescape"))
                    if isinstance(v[i], bytes)
                    else printable(v[i])
                    if isinstance(v[i], str)
                    else v[i]
                )
                for k, v in part.items()
            }


def to_hf(run_dir: str | Path, out: str | Path | None = None) -> Path:
    datasets = _import_datasets()
    run = Path(run_dir)
    latents = find_latents(run)
    out = Path(out) if out else run / "hf"
    if out.exists():
        raise GloError(f"{out}: already exists; remove it or name another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        ds = datasets.Dataset.from_generator(
            rows,
            gen_kwargs={"path": str(latents)},
            features=features(open_latents(latents)),
            cache_dir=str(Path(tmp) / "cache"),
            writer_batch_size=WRITER_BATCH,
        )
        ds.save_to_disk(str(Path(tmp) / "dataset"))
        for name in (METADATA, SUMMARY):
            if (run / name).is_file():
                shutil.copy(run / name, Path(tmp) / "dataset" / f"glo_{name}")
        (Path(tmp) / "dataset").rename(out)
    return out


class ToHF(Schema):
    run_dir: str
    out: str | None


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m glo.to_hf", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a glo.run directory (latents.npz or latents.h5)")
    p.add_argument("out", nargs="?", help="where to write the dataset (default RUN_DIR/hf)")
    args = parsed(ToHF, p, argv)
    with one_line_errors("glo.to_hf"):
        out = to_hf(args.run_dir, args.out)
        print(f"glo.to_hf: {out} (datasets.load_from_disk)")


if __name__ == "__main__":
    main()
