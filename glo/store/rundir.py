"""A run directory that protects what it holds.

A latent dataset is only worth something if every row is what its metadata says. So the directory
records, at its first write, a fingerprint of every setting that changes a row's values; a rerun
with other settings stops before any model loads, naming what differs. A process working in it holds
an OS file lock (released by the kernel however the process ends), so two runs never write the same
directory. Settings that do not change results beyond float rounding (report, logging, workers,
batch size, memory layout, threads, device, export format) are left out of the fingerprint and may
differ between resumes: rows then agree within rounding, not bit for bit (other kernels sum in
another order).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from glo import GloError
from glo.data.digests import sha256_files
from glo.layout import (
    FINGERPRINT,
    HF,
    LATENTS,
    MANIFESTS,
    METADATA,
    REPORT,
    ROWS_VERSION,
    SHARDS,
    SUMMARY,
)
from glo.method.engine import FP16_GRAD_SCALE
from glo.method.settings import Settings
from glo.store.atomic import save_json

log = logging.getLogger("glo")
# besides the engine's settings (tiling blends seams; seed draws masks)
OTHER_RESULTS = ("tile_size", "seed")
PRECISION_KEYS = {"precision", "fp16_grad_scale"}  # what precision=auto may change between machines
# ids and weights cover them
NOT_RESULTS = {"data": ("on_error", "cache_in_memory", "limit"), "vae": ("path",)}
# What glo writes in a run directory: the dataset (PUBLISHED, made from the shards at the end) and
# the rest
PUBLISHED = (*LATENTS.values(), METADATA, SUMMARY, HF)
RESULTS = (SHARDS, *PUBLISHED, *REPORT, "events.out.tfevents.*")
WEIGHT_FILES = ("*.json", "*.safetensors", "*.bin")


def weights_sha256(folder: Path | None, name: str = "") -> str | None:
    """Hash of a diffusers model directory's config and weights (the VAE's own `vae/` inside a
    pipeline), of a single weights file (vae=sd_file), or of the TAESD encoder/decoder pair the VAE
    `name` loads from a folder, whatever their names: a file moved or renamed still resumes."""
    from glo.model.vae import ORIGINAL, original_pair

    if folder is not None and folder.is_file() and (m := ORIGINAL.fullmatch(folder.name)):
        folder, name = folder.parent, m[1]  # one file of a pair: the pair loads
    elif folder is not None and folder.is_file():
        return sha256_files({"weights": folder})
    if folder is None or not folder.is_dir():
        return None
    if not (folder / "config.json").is_file() and (folder / "vae").is_dir():
        folder = folder / "vae"
    if not (folder / "config.json").is_file() and any(
        ORIGINAL.fullmatch(f.name) for f in folder.iterdir()
    ):
        try:
            return sha256_files(dict(zip(("encoder", "decoder"), original_pair(folder, name))))
        except GloError:
            return None  # no pair to load: loading the VAE says why
    return sha256_files(
        {f.name: f for f in sorted(p for pattern in WEIGHT_FILES for p in folder.glob(pattern))}
    )


def vae_folder(vae: DictConfig) -> Path | None:
    """Where a VAE config's weights are on disk before it loads: vae.path, the shipped asset, or the
    hub cache."""
    from glo.model.vae import asset_folder

    if vae.get("path"):
        return Path(vae.path)
    if vae.get("asset"):
        return asset_folder(vae.asset)
    if vae.get("pretrained"):
        from huggingface_hub import try_to_load_from_cache

        name = f"{vae.subfolder}/config.json" if vae.get("subfolder") else "config.json"
        cached = try_to_load_from_cache(vae.pretrained, name)
        return Path(cached).parent if isinstance(cached, str) else None
    return None  # random weights: the config and seed are the identity


def fingerprint(cfg: DictConfig, ids: list[str], precision: str) -> dict[str, Any]:
    """Every setting that changes a row's values, flat with dotted keys (as the CLI spells them).
    The images' and mask files' contents are not in it: each row records their SHA-256, and a resume
    recomputes the rows whose files changed."""
    groups = {
        name: {
            k: v
            for k, v in OmegaConf.to_container(cfg[name], resolve=True).items()
            if k not in NOT_RESULTS.get(name, ()) and not k.startswith("_")
        }
        for name in ("data", "vae", "loss")
    }
    groups["vae"]["weights_sha256"] = weights_sha256(vae_folder(cfg.vae), cfg.vae.name)
    mask = OmegaConf.to_container(cfg.mask, resolve=True)
    ids_sha256 = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    return {
        **flatten(groups),
        "data.ids": f"{len(ids)} images, sha256 {ids_sha256[:16]}",
        **flatten({"mask": mask}),
        **OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, list(Settings.model_fields)), resolve=True
        ),
        **{k: cfg[k] for k in OTHER_RESULTS},
        "precision": precision,  # the one used, not `auto`
        # the fp16 gradient scale decides what fp16 fits: rows fitted under another must not resume
        **({"fp16_grad_scale": FP16_GRAD_SCALE} if precision == "fp16" else {}),
        # shards with other columns would not merge: refuse before computing more
        "rows_version": ROWS_VERSION,
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def lock(run_dir: Path) -> IO[str]:
    """An exclusive OS lock on the directory for as long as the returned file stays open (the
    process lives)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise GloError(
            f"{run_dir}: another glo process is working in this directory; wait for it to end, or "
            "use another hydra.run.dir"
        ) from None
    return f


def claim(run_dir: Path, expected: dict[str, Any], resume: str) -> None:
    """Make the directory this run's: refuse one whose results were made with other settings, unless
    resume=restart clears it, and one that holds files named like glo's without glo's fingerprint
    (glo did not make them, so nothing there is overwritten or deleted). A directory without results
    takes this run's settings: nothing made there could be mixed. Temporary files of a process that
    died mid-write (this one holds the lock) are removed."""
    stored = run_dir / FINGERPRINT
    fix = (
        "use a new hydra.run.dir, or resume=restart to delete this directory's results and start "
        "over"
    )
    foreign = [
        p.name
        for name in RESULTS
        for p in run_dir.glob(name)
        if not (p.is_dir() and not any(p.iterdir()))
    ]
    if foreign and not stored.is_file():
        raise GloError(
            f"{run_dir}: holds {foreign[0]} but no {FINGERPRINT}, so glo did not make this "
            "directory (or an older glo did); nothing in it is touched: use a new hydra.run.dir"
        )
    for tmp in (*run_dir.glob(".*.tmp"), *run_dir.glob(f"{SHARDS}/.*.tmp")):
        tmp.unlink()
    if resume == "restart":
        clear(run_dir)
    results = any(any(run_dir.glob(name)) for name in (f"{SHARDS}/{MANIFESTS}", *LATENTS.values()))
    if results:
        try:
            found = json.loads(stored.read_text())
        except (OSError, ValueError) as e:
            raise GloError(f"{stored}: unreadable ({e}); {fix}") from None
        differ = [
            k for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)
        ]
        if differ:
            shown = "; ".join(f"{k}: {found.get(k)!r} -> {expected.get(k)!r}" for k in differ[:4])
            more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
            # the same command on another machine
            if "precision" in differ and set(differ) <= PRECISION_KEYS:
                fix = (
                    f"run with precision={found['precision']} to resume it as it was made, or {fix}"
                )
            raise GloError(f"{run_dir}: made with other settings ({shown}{more}); {fix}")
        return
    save_json(stored, expected)


def clear(run_dir: Path) -> None:
    """resume=restart: remove every result of an earlier run (Hydra's and the lock file stay)."""
    removed = [p for name in (*RESULTS, FINGERPRINT) for p in run_dir.glob(name)]
    remove(removed)
    if removed:
        log.info("resume=restart: removed %d earlier results from %s", len(removed), run_dir)


def unpublish(run_dir: Path) -> None:
    """Before a run computes images: the dataset made from earlier shards is removed, so that a run
    killed before its merge leaves no file whose rows disagree with the shards; the merge writes it
    again from all of them."""
    remove([p for name in PUBLISHED for p in run_dir.glob(name)])


def remove(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
