"""Write the latent dataset: one shard per finished batch, merged into latents.npz at the end.

Every file is written to a temporary name and renamed, so a file that exists is complete. Shards
are the resume state: a run started again in the same directory skips the ids they hold.
"""
from __future__ import annotations

import json
import os
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, IO

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset

from glo import GloError


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a latents.npz (or a shard), with a one-line error for a missing or damaged file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise GloError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GloError(f"{path}: not a readable latents file ({e})") from None


class LatentDataset(Dataset):
    """Optimized latents for downstream training: item = {id, latent, initial_latent} as float32 tensors."""

    def __init__(self, path: str | Path) -> None:
        arrays = load_latents(path)
        self.ids = [str(i) for i in arrays["ids"]]
        self.latents = torch.from_numpy(arrays["latents"])
        self.initial_latents = torch.from_numpy(arrays["initial_latents"])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"id": self.ids[i], "latent": self.latents[i], "initial_latent": self.initial_latents[i]}


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
        "converged": int(a["converged"].sum()),
        "nonfinite": int(a["nonfinite"].sum()),
        "seconds_total": seconds,
        "images_per_second": len(a["ids"]) / seconds if seconds > 0 else float("nan"),
    }


class LatentExporter(pl.Callback):
    """Shards each predicted batch, then merges them into latents.npz, metadata.json and summary.json."""

    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir)
        self.shards = self.out / "shards"
        self.metadata: dict[str, Any] = {}
        self.summary: dict[str, float | int] = {}

    def _manifests(self) -> dict[str, list[str]]:
        """Completed shards and their ids, from every rank's manifest (a shard is listed only once written)."""
        done: dict[str, list[str]] = {}
        for m in sorted(self.shards.glob("manifest-*.json")):
            done.update(json.loads(m.read_text()))
        return done

    def _shard_files(self) -> list[Path]:
        return [self.shards / name for name in sorted(self._manifests())]

    def done_ids(self) -> set[str]:
        """Ids already in complete shards: a resumed run skips them."""
        return {i for ids in self._manifests().values() for i in ids}

    def on_predict_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.metadata["start_time"] = datetime.now(timezone.utc).isoformat()

    def on_predict_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: dict[str, np.ndarray],
                             batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        rank = trainer.global_rank
        manifest_file = self.shards / f"manifest-{rank}.json"
        manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        name = f"shard-{rank}-{len(manifest):06d}.npz"
        save_npz(self.shards / name, outputs)
        manifest[name] = [str(i) for i in outputs["ids"]]
        save_json(manifest_file, manifest)  # the shard counts as done only from here on

    def on_predict_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.merge()

    def merge(self) -> dict[str, np.ndarray]:
        parts = [load_latents(f) for f in self._shard_files()]
        if not parts:
            raise GloError(f"{self.shards}: no finished batches to export")
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        self.summary = summarize(arrays)
        self.metadata["end_time"] = datetime.now(timezone.utc).isoformat()
        save_npz(self.out / "latents.npz", arrays)
        save_json(self.out / "metadata.json", self.metadata)
        save_json(self.out / "summary.json", self.summary)
        return arrays
