"""Write the latent dataset: one shard per finished batch, merged into latents.npz at the end.

Every file is written to a temporary name and renamed, so a file that exists is complete. Shards
are the resume state: a run started again in the same directory skips the ids they hold.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from glo import GloError
from glo.atomic import atomic_path, save_json, save_npz

log = logging.getLogger("glo")


def append_h5(f: h5py.File, arrays: dict[str, np.ndarray]) -> None:
    """Append one shard's rows to resizable, chunked, compressed datasets (created on the first shard)."""
    for key, a in arrays.items():
        if a.dtype.kind == "U":
            a = a.astype(object)
        if key not in f:
            dtype = h5py.string_dtype() if a.dtype == object else a.dtype
            f.create_dataset(key, shape=(0, *a.shape[1:]), maxshape=(None, *a.shape[1:]), dtype=dtype,
                             chunks=(64, *a.shape[1:]), compression="gzip", compression_opts=4)
        d = f[key]
        d.resize(d.shape[0] + len(a), axis=0)
        d[-len(a):] = a


def _npz_member(path: Path, z: zipfile.ZipFile, key: str) -> np.ndarray:
    """A numeric member of an uncompressed .npz (what np.savez writes), memory-mapped rather than read."""
    info = z.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
        return np.load(z.open(info))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype.kind == "U":
            f.seek(info.header_offset + 30 + name_len + extra_len)
            return np.lib.format.read_array(f)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=f.tell(), order="F" if fortran else "C")


REQUIRED = ("ids", "latents")  # what every reader needs; LatentDataset also reads initial_latents
INPAINTING = ("latent_masks", "masked_latents")


def open_latents(path: str | Path) -> dict[str, Any]:
    """Every array of a latents.npz / latents.h5 (or a shard), read lazily: NPZ members are memory-mapped,
    HDF5 datasets are read chunk by chunk as they are indexed. One-line error for a missing or damaged file."""
    path = Path(path)
    try:
        if path.suffix == ".h5":
            f = h5py.File(path, "r")
            groups = [k for k in f if not isinstance(f[k], h5py.Dataset)]
            if groups:
                raise GloError(f"{path}: '{groups[0]}' is an HDF5 group; a latents file holds only arrays")
            arrays = {k: f[k] for k in f}
        else:
            with zipfile.ZipFile(path) as z:
                arrays = {n[:-4]: _npz_member(path, z, n[:-4]) for n in z.namelist() if n.endswith(".npy")}
        return require(path, arrays, REQUIRED)
    except FileNotFoundError:
        raise GloError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
        raise GloError(f"{path}: not a readable latents file ({e})") from None


def require(path: Path, arrays: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """One line naming the first required array that is missing or has another number of rows than `ids`."""
    for k in keys:
        if k not in arrays:
            raise GloError(f"{path}: no '{k}' array (a glo latents file has {', '.join(keys)}; it has "
                           f"{', '.join(sorted(arrays)) or 'none'})")
        if len(arrays[k]) != len(arrays[keys[0]]):
            raise GloError(f"{path}: '{k}' has {len(arrays[k])} rows, '{keys[0]}' has {len(arrays[keys[0]])}")
    return arrays


def find_latents(run_dir: str | Path) -> Path:
    """The latents file of a run directory, whichever format it was exported in."""
    run = Path(run_dir)
    for name in ("latents.npz", "latents.h5"):
        if (run / name).is_file():
            return run / name
    raise GloError(f"{run / 'latents.npz'}: no such file (nor latents.h5)")


def _in_memory(v: Any) -> np.ndarray:
    """A writable copy of a lazy array; HDF5 strings (objects) become str."""
    a = np.array(v[()])
    return a.astype(str) if a.dtype == object else a


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a latents file, in memory."""
    return {k: _in_memory(v) for k, v in open_latents(path).items()}


class LatentDataset(Dataset):
    """Optimized latents for downstream training: item = {id, latent, initial_latent} as float32 tensors.

    inpainting=True adds what Stable Diffusion's inpainting UNet is conditioned on: `mask` (1,h,w), 1 = hole,
    and `masked_latent` (4,h,w), the optimized latent of the masked image. diffusers' pipeline builds its
    9-channel input as torch.cat([noisy_latent, mask, masked_latent], dim=1); `latent` is the clean target.
    Reads lazily from either format, so a dataset larger than memory still trains.
    """

    def __init__(self, path: str | Path, inpainting: bool = False) -> None:
        self.path, self.inpainting = Path(path), inpainting
        arrays = open_latents(self.path)
        if inpainting and "masked_latents" not in arrays:
            raise GloError(f"{self.path}: exported without a mask; run glo.run with mask=boxes|strokes|folder")
        require(self.path, arrays, (*REQUIRED, "initial_latents", *(INPAINTING if inpainting else ())))
        self.ids = [str(i) for i in _in_memory(arrays["ids"])]
        self._arrays: dict[str, Any] | None = None  # opened on first use, so DataLoader workers each open their own

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._arrays is None:
            self._arrays = open_latents(self.path)
        keys = {"latent": "latents", "initial_latent": "initial_latents"}
        if self.inpainting:
            keys.update(mask="latent_masks", masked_latent="masked_latents")
        return {"id": self.ids[i],
                **{k: torch.from_numpy(np.array(self._arrays[a][i], dtype=np.float32)) for k, a in keys.items()}}


FORMATS = ("npz", "hdf5")
SUMMARY_KEYS = ("ids", "psnr_initial", "psnr_final", "ssim_initial", "ssim_final", "steps", "passes", "converged",
                "nonfinite", "seconds", "psnr_known_initial", "psnr_known_final")  # the last two only with a mask


def summarize(a: dict[str, np.ndarray]) -> dict[str, float | int]:
    """The headline figures of a latent dataset, from its arrays alone."""
    gain = a["psnr_final"] - a["psnr_initial"]
    seconds = float(a["seconds"].sum())
    return {
        "num_images": int(len(a["ids"])),
        "psnr_initial_mean": float(a["psnr_initial"].mean()),
        "psnr_final_mean": float(a["psnr_final"].mean()),
        "psnr_gain_mean": float(gain.mean()),
        "ssim_initial_mean": float(a["ssim_initial"].mean()),
        "ssim_final_mean": float(a["ssim_final"].mean()),
        "images_improved": int((gain > 0).sum()),
        "steps_mean": float(a["steps"].mean()),
        **({"passes_mean": float(a["passes"].mean())} if "passes" in a else {}),
        "converged": int(a["converged"].sum()),
        "nonfinite": int(a["nonfinite"].sum()),
        "seconds_total": seconds,
        "images_per_second": len(a["ids"]) / seconds if seconds > 0 else float("nan"),
        **({"psnr_known_initial_mean": float(a["psnr_known_initial"].mean()),
            "psnr_known_final_mean": float(a["psnr_known_final"].mean()),
            "known_images_improved": int((a["psnr_known_final"] > a["psnr_known_initial"]).sum())}
           if "psnr_known_final" in a else {}),
    }


def read_manifest(path: Path) -> dict[str, list[str]]:
    """A rank's manifest: shard name -> the ids it holds."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise GloError(f"{path}: damaged ({e}); use resume=restart to start this directory over") from None


def shard_problem(path: Path, ids: list[str]) -> str | None:
    """Why a shard cannot be trusted (missing, damaged, other ids than listed), or None."""
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # every member's CRC: a truncated or corrupted file fails here
        if bad:
            return f"damaged ({bad} fails its checksum)"
        with np.load(path) as f:
            found = [str(i) for i in f["ids"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return f"damaged ({e})"
    return None if found == ids else "holds other images than its manifest lists"


class Stopped(GloError):
    """A run stopped on request (SIGTERM) with everything finished so far intact."""

    exit_code = 143  # 128 + SIGTERM, what shells and schedulers expect


class LatentExporter(pl.Callback):
    """Shards each predicted batch, then merges them into latents.npz, metadata.json and summary.json."""

    def __init__(self, out_dir: str, format: str) -> None:
        if format not in FORMATS:
            raise GloError(f"export.format={format}: must be one of {', '.join(FORMATS)}")
        self.out, self.format = Path(out_dir), format
        self.shards = self.out / "shards"
        self.metadata: dict[str, Any] = {}
        self.summary: dict[str, float | int] = {}

    def _manifests(self) -> dict[str, list[str]]:
        """Completed shards and their ids, from every rank's manifest (a shard is listed only once written)."""
        done: dict[str, list[str]] = {}
        for m in sorted(self.shards.glob("manifest-*.json")):
            done.update(read_manifest(m))
        return done

    def done_ids(self) -> set[str]:
        """Ids already in complete shards: a resumed run skips them."""
        return {i for ids in self._manifests().values() for i in ids}

    def verify(self) -> None:
        """Before a resume: every listed shard must read back whole and hold exactly the ids its manifest lists.
        A damaged or missing one is unlisted and deleted, so its images are computed again."""
        seen: dict[str, str] = {}
        for m in sorted(self.shards.glob("manifest-*.json")):
            manifest = read_manifest(m)
            good = {}
            for name, ids in manifest.items():
                problem = shard_problem(self.shards / name, ids)
                if problem:
                    log.warning("%s: %s; its %d image(s) will be computed again", self.shards / name, problem, len(ids))
                    (self.shards / name).unlink(missing_ok=True)
                    continue
                twice = [i for i in ids if i in seen]
                if twice:
                    raise GloError(f"{self.shards / name}: image '{twice[0]}' is also in {seen[twice[0]]}; "
                                   "use resume=restart to start this directory over")
                seen.update(dict.fromkeys(ids, name))
                good[name] = ids
            if good != manifest:
                save_json(m, good)

    def on_predict_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.metadata["start_time"] = datetime.now(timezone.utc).isoformat()

    def on_predict_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: dict[str, np.ndarray],
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        rank = trainer.global_rank
        manifest_file = self.shards / f"manifest-{rank}.json"
        manifest = read_manifest(manifest_file) if manifest_file.is_file() else {}
        ids = [str(i) for i in outputs["ids"]]
        # Named by the dataset position of its first image (so names sort in dataset order) and a hash of its
        # ids: two shards with different images can never share a name.
        name = f"shard-{int(batch[1]['index'][0]):08d}-{hashlib.sha1(json.dumps(ids).encode()).hexdigest()[:8]}.npz"
        save_npz(self.shards / name, outputs)
        manifest[name] = ids
        save_json(manifest_file, manifest)  # the shard counts as done only from here on
        if getattr(trainer, "received_sigterm", False):
            raise Stopped(f"stopped by SIGTERM after the current batch; {len(self.done_ids())} image(s) are safe in "
                          f"{self.shards}: run the same command again to resume")

    def on_predict_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.strategy.barrier("glo-export")  # every rank's shards are on disk before rank 0 merges them
        if trainer.is_global_zero:
            self.merge()

    def merge(self) -> None:
        """Shards -> latents.npz (all in memory) or latents.h5 (streamed shard by shard), then the JSON files."""
        files = [self.shards / name for name in sorted(self._manifests())]
        if not files:
            raise GloError(f"{self.shards}: no finished batches to export")
        columns: dict[str, list[np.ndarray]] = {}
        stale = self.out / ("latents.npz" if self.format == "hdf5" else "latents.h5")
        stale.unlink(missing_ok=True)  # another format's file from an earlier run would be read instead
        if self.format == "hdf5":
            with atomic_path(self.out / "latents.h5") as tmp, h5py.File(tmp, "w") as f:
                for shard in files:
                    part = load_latents(shard)
                    append_h5(f, part)
                    for k in SUMMARY_KEYS:
                        if k in part:
                            columns.setdefault(k, []).append(part[k])
        else:
            for shard in files:
                for k, v in load_latents(shard).items():
                    columns.setdefault(k, []).append(v)
            save_npz(self.out / "latents.npz", {k: np.concatenate(v) for k, v in columns.items()})
        self.summary = summarize({k: np.concatenate(columns[k]) for k in SUMMARY_KEYS if k in columns})
        self.metadata["end_time"] = datetime.now(timezone.utc).isoformat()
        save_json(self.out / "metadata.json", self.metadata)
        save_json(self.out / "summary.json", self.summary)
