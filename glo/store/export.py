"""Write the latent dataset: one shard per finished batch, merged into latents.npz at the end.

Every file is written to a temporary name and renamed, so a file that exists is complete. Shards
are the resume state: a run started again in the same directory skips the ids they hold.
"""

from __future__ import annotations

import json
import logging
import zipfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from glo import GloError
from glo.data.digests import text_digest
from glo.latents import failed_crc, load_latents
from glo.layout import (
    LATENTS,
    MANIFESTS,
    METADATA,
    SESSIONS,
    SHARDS,
    SMALL,
    STOP,
    SUMMARY,
    manifest,
    manifests,
    read_manifest,
    row_problem,
    shard_name,
)
from glo.store.atomic import atomic_path, save_json, save_npz, to_json
from glo.store.summary import summarize

log = logging.getLogger("glo")


def append_h5(f: h5py.File, arrays: dict[str, np.ndarray]) -> None:
    """Append one shard's rows to resizable, chunked, compressed datasets (created on the first
    shard)."""
    for key, a in arrays.items():
        # any name a filesystem allows, also one that is not UTF-8, as its own bytes
        if a.dtype.kind == "U":
            a = np.array([s.encode("utf-8", "surrogateescape") for s in a], dtype=object)
        if key not in f:
            text = a.dtype == object
            # numbers: each chunk carries a Fletcher-32 sum that every read checks; HDF5 cannot
            # filter strings, so text columns carry a digest of their whole content (text_digest),
            # set once all rows are in
            f.create_dataset(
                key,
                shape=(0, *a.shape[1:]),
                maxshape=(None, *a.shape[1:]),
                dtype=h5py.string_dtype() if text else a.dtype,
                chunks=(64, *a.shape[1:]),
                compression="gzip",
                compression_opts=4,
                fletcher32=not text,
            )
        d = f[key]
        d.resize(d.shape[0] + len(a), axis=0)
        d[-len(a) :] = a


def shard_problem(
    path: Path, ids: list[str], digests: dict[str, str], mask_digests: dict[str, str] | None = None
) -> str | None:
    """Why a shard cannot be trusted (missing, damaged, other ids than listed, made from an image or
    a mask file that has changed since: `digests` and `mask_digests` are their SHA-256 now, by id),
    or None."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            # every member's CRC: a truncated or corrupted file fails here
            bad = failed_crc(path, z)
        if bad:
            return f"damaged ({bad} fails its checksum)"
        with np.load(path) as f:
            found, made_from = [str(i) for i in f["ids"]], [str(h) for h in f["source_sha256"]]
            masked_by = [str(h) for h in f["mask_sha256"]] if mask_digests is not None else []
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"damaged ({e})"
    if found != ids:
        return "holds other images than its manifest lists"
    changed = [i for i, h in zip(ids, made_from) if digests[i] != h]
    if changed:
        return f"image '{changed[0]}' has changed since (its source's SHA-256 differs)"
    changed = [i for i, h in zip(ids, masked_by) if mask_digests[i] != h]
    return (
        f"the mask of image '{changed[0]}' has changed since (its SHA-256 differs)"
        if changed
        else None
    )


def same_columns(files: list[Path]) -> Iterator[dict[str, np.ndarray]]:
    """Each shard's arrays, refusing a shard whose columns differ from the first's: merged, its rows
    would misalign with the others' (a shard from an older glo in a resumed directory)."""
    first: set[str] | None = None
    for shard in files:
        part = load_latents(shard)
        first = set(part) if first is None else first
        if set(part) != first:
            odd = sorted(set(part) ^ first)[0]
            raise GloError(
                f"{shard}: has other columns than {files[0].name} ({odd!r} in one only), so an "
                "older glo made one of them; use resume=restart to start this directory over"
            )
        yield part


class RunExport:
    """A run directory's results: a shard per finished batch, listed in its rank's manifest, merged
    at the end into latents.npz (or latents.h5), metadata.json and summary.json."""

    def __init__(self, out_dir: str, format: str) -> None:
        if format not in LATENTS:
            raise GloError(f"export.format={format}: must be one of {', '.join(LATENTS)}")
        self.out, self.format = Path(out_dir), format
        self.shards = self.out / SHARDS
        self.sessions = self.shards / SESSIONS
        # a rank that got SIGTERM tells the others: they stop after their batch
        self.stop_file = self.shards / STOP
        self.metadata: dict[str, Any] = {}
        self.summary: dict[str, float | int] = {}

    def done_ids(self) -> set[str]:
        """Ids already in complete shards: a resumed run skips them."""
        return {i for ids in manifests(self.shards).values() for i in ids}

    def stopped(self, how: str) -> str:
        """The line a run stopped on request ends with: what is safe, and how to go on."""
        return (
            f"stopped {how}; {len(self.done_ids())} image(s) are safe in {self.shards}: run the "
            "same command again to resume"
        )

    def earlier_sessions(self) -> list[dict[str, Any]]:
        """The runs that computed images here (a record for metadata.json, not results): read before
        any work, so a damaged one is one line at the start rather than a traceback after all the
        computing."""
        try:
            found = json.loads(self.sessions.read_text()) if self.sessions.is_file() else []
        except ValueError as e:
            raise GloError(
                f"{self.sessions}: damaged ({e}); it only records which runs computed here: delete "
                "it and run the same command again"
            ) from None
        if not isinstance(found, list):
            raise GloError(
                f"{self.sessions}: not a list of runs; delete it and run the same command again"
            )
        return found

    def verify(self, digests: dict[str, str], mask_digests: dict[str, str] | None = None) -> None:
        """Before a resume: every listed shard must read back whole, hold exactly the ids its
        manifest lists and have been made from the images and mask files as they are now (`digests`,
        `mask_digests`: each one's SHA-256, by id). Any other is unlisted and deleted, so its images
        are computed again."""
        self.earlier_sessions()
        seen: dict[str, str] = {}
        for m in sorted(self.shards.glob(MANIFESTS)):
            listed = read_manifest(m)
            good = {}
            for name, ids in listed.items():
                problem = shard_problem(self.shards / name, ids, digests, mask_digests)
                if problem:
                    log.warning(
                        "%s: %s; its %d image(s) will be computed again",
                        self.shards / name,
                        problem,
                        len(ids),
                    )
                    (self.shards / name).unlink(missing_ok=True)
                    continue
                twice = [i for i in ids if i in seen]
                if twice:
                    raise GloError(
                        f"{self.shards / name}: image '{twice[0]}' is also in {seen[twice[0]]}; "
                        "use resume=restart to start this directory over"
                    )
                seen.update(dict.fromkeys(ids, name))
                good[name] = ids
            if good != listed:
                save_json(m, good)

    def record_session(self) -> None:
        """Each run that computes images here, so a resumed dataset names every machine."""
        now = {k: self.metadata.get(k) for k in ("start_time", "machine", "precision")}
        save_json(
            self.sessions,
            [*self.earlier_sessions(), {**now, "images_done_before": len(self.done_ids())}],
        )

    def save_batch(self, rank: int, first: int, outputs: dict[str, np.ndarray]) -> None:
        """One batch's rows as a shard, then in the rank's manifest: the shard counts as done only
        from there. `first`: the dataset position of its first image. Rows that are not what
        glo.layout declares are a bug, refused before they reach the disk."""
        problem = row_problem(outputs)
        if problem:
            raise ValueError(f"glo.layout: {problem}")
        listed_in = manifest(self.shards, rank)
        listed = read_manifest(listed_in) if listed_in.is_file() else {}
        ids = [str(i) for i in outputs["ids"]]
        name = shard_name(first, ids)
        save_npz(self.shards / name, outputs)
        listed[name] = ids
        save_json(listed_in, listed)

    def clear_stop(self) -> None:
        """Before any other rank starts: a stop left by a stopped run is not a stop for this one."""
        self.stop_file.unlink(missing_ok=True)

    def merge(self) -> None:
        """Shards -> latents.npz (all in memory) or latents.h5 (streamed shard by shard), then the
        JSON files."""
        files = [self.shards / name for name in sorted(manifests(self.shards))]
        if not files:
            raise GloError(f"{self.shards}: no finished batches to export")
        columns: dict[str, list[np.ndarray]] = {}
        stale = self.out / LATENTS["npz" if self.format == "hdf5" else "hdf5"]
        # another format's file from an earlier run would be read instead
        stale.unlink(missing_ok=True)
        self.metadata["end_time"] = datetime.now(timezone.utc).isoformat()
        if self.sessions.is_file():
            self.metadata["sessions"] = self.earlier_sessions()
        if self.format == "hdf5":
            with atomic_path(self.out / LATENTS["hdf5"]) as tmp, h5py.File(tmp, "w") as f:
                # HDF5 files describe themselves: one copied without metadata.json still says what
                # made it
                f.attrs["metadata"] = to_json(self.metadata)
                for part in same_columns(files):
                    append_h5(f, part)
                    for k in SMALL:
                        if k in part:
                            columns.setdefault(k, []).append(part[k])
                for d in f.values():
                    if d.dtype == object:
                        d.attrs["sha256"] = text_digest(d[()])
        else:
            for part in same_columns(files):
                for k, v in part.items():
                    columns.setdefault(k, []).append(v)
            save_npz(self.out / LATENTS["npz"], {k: np.concatenate(v) for k, v in columns.items()})
        self.summary = summarize({k: np.concatenate(columns[k]) for k in SMALL if k in columns})
        save_json(self.out / METADATA, self.metadata)
        save_json(self.out / SUMMARY, self.summary)
