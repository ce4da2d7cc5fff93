"""What a run directory holds: its file names, the columns of an exported row, its manifests.

The one home of the format: the fit that makes rows, the exporter, the readers and the reports
take names from here, and every shard is checked against COLUMNS before it is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from glo import GloError

# bump when a column comes or goes: a run directory resumes only rows of its own version
ROWS_VERSION = 6

LATENTS = {"npz": "latents.npz", "hdf5": "latents.h5"}  # by export.format
METADATA, SUMMARY, FINGERPRINT = "metadata.json", "summary.json", "fingerprint.json"
SHARDS = "shards"  # one .npz per finished batch, each listed in its rank's manifest once whole
SESSIONS, STOP = "sessions.json", "stop"  # in SHARDS: who computed here; a stop for every rank
MANIFESTS = "manifest-*.json"
PLOTS = ("loss_curves", "psnr_scatter", "psnr_gain", "steps", "gain_vs_drift")  # each a .png
METRICS_CSV, REPORT_MD, GRIDS = "metrics.csv", "report.md", "grids.png"  # python -m glo.evaluate's
REPORT = (METRICS_CSV, REPORT_MD, GRIDS, *(f"{p}.png" for p in PLOTS))
HF = "hf"  # python -m glo.to_hf's dataset


def manifest(shards: Path, rank: int) -> Path:
    """A rank's manifest: shard file name -> the ids it holds."""
    return shards / f"manifest-{rank}.json"


def shard_name(first: int, ids: list[str]) -> str:
    """Named by the dataset position of its first image (names sort in dataset order) and a hash
    of its ids, so two shards with other images never share a name."""
    digest = hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:8]
    return f"shard-{first:08d}-{digest}.npz"


def read_manifest(path: Path) -> dict[str, list[str]]:
    """A rank's manifest, or one line naming it and the fix."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise GloError(
            f"{path}: damaged ({e}); use resume=restart to start this directory over"
        ) from None


def manifests(shards: Path) -> dict[str, list[str]]:
    """Every rank's finished shards and their ids."""
    done: dict[str, list[str]] = {}
    for m in sorted(shards.glob(MANIFESTS)):
        done.update(read_manifest(m))
    return done


@dataclass(frozen=True)
class Column:
    """One array of a latents file, one row per image: its numpy kind (U text, f float, i integer,
    b bool) and the shape of a row (C channels, h x w latent, H x W pixels, T max_steps)."""

    kind: str
    shape: tuple[str, ...]
    meaning: str


def _pair(name: str, kind: str, shape: tuple[str, ...], meaning: str) -> dict[str, Column]:
    """A figure of the encoder's latent (`_initial`) and of the optimized one (`_final`)."""
    return {f"{name}_{w}": Column(kind, shape, f"{meaning}, {w}") for w in ("initial", "final")}


METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "mae": "mean absolute error"}
DRIFT_STATS = {
    "hf_share": ((), "share of the latent's power at high spatial frequencies"),
    "channel_mean": (("C",), "mean of each channel"),
    "channel_std": (("C",), "std of each channel"),
    "channel_moment": (("C", "C"), "mean of z zᵀ over the cells"),
    "reencode_error": ((), "||E(D(z)) - z|| / ||z||"),
}


def _drift(prefix: str) -> dict[str, Column]:
    out = {f"{prefix}drift_distance": Column("f", (), "||z - z0|| / ||z0||, z0 the encoder's")}
    for name, (shape, meaning) in DRIFT_STATS.items():
        out |= _pair(f"{prefix}{name}", "f", shape, meaning)
    return out


DRIFT = tuple(_drift(""))  # a latent's drift columns (glo.method.drift); masked_ for the masked
COLUMNS: dict[str, Column] = {
    "ids": Column("U", (), "the image's id: its file name without the extension"),
    "sources": Column("U", (), "the file the pixels were read from"),
    "source_sha256": Column("U", (), "SHA-256 of that file: a resume and glo.evaluate check it"),
    "original_size": Column("i", ("2",), "the image's height and width before resizing"),
    "latents": Column("f", ("C", "h", "w"), "the optimized latent, in the diffusion model's units"),
    "initial_latents": Column("f", ("C", "h", "w"), "the encoder's latent (posterior mean)"),
    "steps": Column("i", (), "Adam updates before the image stopped"),
    "passes": Column("f", (), "decoder passes spent: forward + backward 1, a forward alone 0.5"),
    "initial_loss": Column("f", (), "loss of the encoder's latent"),
    "final_loss": Column("f", (), "loss of the optimized latent"),
    **{k: c for m, meaning in METRICS.items() for k, c in _pair(m, "f", (), meaning).items()},
    "converged": Column("b", (), "stopped because its loss stopped changing"),
    "nonfinite": Column("b", (), "met a non-finite loss and went back to its best latent"),
    "loss_curves": Column("f", ("T",), "loss before each update; NaN after the image stopped"),
    **_drift(""),
    "seconds": Column("f", (), "its batch's time per image"),
    "rank": Column("i", (), "the DDP rank that made it (images_per_second counts the busiest)"),
}
MASKED: dict[str, Column] = {  # with mask=boxes|strokes|folder: the image with its hole greyed
    "masks": Column("b", ("H", "W"), "the hole, 1 = hole"),
    "latent_masks": Column("f", ("1", "h", "w"), "the hole at latent resolution (max-pooled)"),
    "masked_latents": Column("f", ("C", "h", "w"), "the masked image's optimized latent"),
    "initial_masked_latents": Column("f", ("C", "h", "w"), "the masked image's encoder latent"),
    "masked_steps": Column("i", (), "Adam updates of the masked image"),
    "masked_passes": Column("f", (), "decoder passes of the masked image"),
    **_pair("psnr_known", "f", (), "the masked image's PSNR (dB) on the known pixels"),
    **_drift("masked_"),
    "mask_sha256": Column("U", (), "SHA-256 of the mask file (mask=folder)"),
}
REQUIRED = ("ids", "latents")  # what every reader needs
INPAINTING = ("latent_masks", "masked_latents", "initial_masked_latents")  # LatentDataset's
# the columns summary.json is made from: none image- or latent-sized, so HDF5 can stream the rest
SMALL = tuple(
    k
    for k, c in (COLUMNS | MASKED).items()
    if (c.kind != "U" or k == "ids") and not {"h", "H", "T"} & set(c.shape)
)


def columns_table() -> str:
    """docs/run-directory.md's table of the columns (tests/test_structure.py keeps it equal)."""
    rows = [
        f"| `{k}` | {c.kind} | {', '.join(('N', *c.shape))} | {c.meaning} |"
        for k, c in (COLUMNS | MASKED).items()
    ]
    head = "| column | kind | shape | what it holds |\n|---|---|---|---|\n"
    return head + "\n".join(rows) + "\n"


def row_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What makes a batch's rows differ from COLUMNS (an undeclared column, another kind or number
    of axes, another number of rows), or None."""
    declared = COLUMNS | MASKED
    n = len(arrays["ids"])
    for k, a in arrays.items():
        c = declared.get(k)
        if c is None:
            return f"column '{k}' is not declared in glo.layout"
        if a.dtype.kind != c.kind or a.ndim != 1 + len(c.shape) or len(a) != n:
            axes = ", ".join(("rows", *c.shape))
            return f"column '{k}' is {a.dtype}{a.shape}, declared {c.kind} ({axes})"
    missing = [k for k in COLUMNS if k not in arrays]
    return f"column '{missing[0]}' is missing" if missing else None
