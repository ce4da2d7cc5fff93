"""python -m glo.run: build everything the config names, optimize every image's latent, export the dataset.

Returns the mean PSNR gain, so Hydra sweepers can maximize it over a --multirun.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from glo import GloError, one_line_errors, rundir
from glo.evaluate import evaluate
from glo.export import LatentExporter
from glo.hardware import PRECISIONS, machine, resolve_precision
from glo.module import OPTIMS
from glo.vae import pick_device

log = logging.getLogger("glo")
DEVICES = ("auto", "cpu", "cuda", "mps")
SCHEDULES = ("constant", "cosine")
HPARAM_METRICS = ("psnr_gain_mean", "psnr_final_mean", "ssim_final_mean", "steps_mean", "images_per_second")


NUMBERS = {"lr": float, "rel_tol": float, "max_steps": int, "window": int, "batch_size": int, "warmup_steps": int,
           "seed": int, "num_workers": int, "tile_size": int}
PATHS = ("data.path", "data.processed_data_dir", "mask.path", "vae.path")  # stored absolute, with ~ expanded


def _is_number(value: object, kind: type) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)


def validate(cfg: DictConfig) -> None:
    """Reject impossible settings before anything slow is built (unknown keys are Hydra's to reject)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise GloError(f"{missing[0]}: must be set (e.g. {missing[0]}=DIR)")
    for key, kind in NUMBERS.items():
        if not _is_number(cfg[key], kind):
            raise GloError(f"{key}={cfg[key]!r}: must be {'a number' if kind is float else 'an integer'}")
    betas = cfg.betas
    if not (OmegaConf.is_list(betas) and len(betas) == 2 and all(_is_number(b, float) and 0 <= b < 1 for b in betas)):
        raise GloError(f"betas={betas if not OmegaConf.is_list(betas) else list(betas)}: must be two numbers in [0, 1), "
                       "e.g. 'betas=[0.9,0.999]'")
    limit = cfg.data.get("limit")
    if limit is not None and not (_is_number(limit, int) and limit >= 1):
        raise GloError(f"data.limit={limit!r}: must be an integer >= 1, or null for every image")
    for key in ("channels_last", "checkpointing", "report"):
        if not isinstance(cfg[key], bool):
            raise GloError(f"{key}={cfg[key]!r}: must be true or false")
    checks = [
        (cfg.lr > 0, f"lr={cfg.lr}: must be > 0"),
        (cfg.max_steps >= 1, f"max_steps={cfg.max_steps}: must be >= 1"),
        (cfg.rel_tol >= 0, f"rel_tol={cfg.rel_tol}: must be >= 0"),
        (cfg.window >= 1, f"window={cfg.window}: must be >= 1"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1"),
        (cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: must be >= 0"),
        (0 <= cfg.seed < 2**32, f"seed={cfg.seed}: must be in [0, 2**32)"),
        (cfg.resume in rundir.RESUME, f"resume={cfg.resume}: must be one of {', '.join(rundir.RESUME)}"),
        (cfg.device in DEVICES, f"device={cfg.device}: must be one of {', '.join(DEVICES)}"),
        (cfg.optim in OPTIMS, f"optim={cfg.optim}: must be one of {', '.join(OPTIMS)}"),
        (cfg.precision in ("auto", *PRECISIONS), f"precision={cfg.precision}: must be one of auto, {', '.join(PRECISIONS)}"),
        (cfg.schedule in SCHEDULES, f"schedule={cfg.schedule}: must be one of {', '.join(SCHEDULES)}"),
        (cfg.tile_size >= 0 and cfg.tile_size % 8 == 0, f"tile_size={cfg.tile_size}: must be 0 or a multiple of 8"),
        (not (cfg.optim == "gradfree" and cfg.loss.known_only),
         "optim=gradfree has no pixel loss to restrict: use optim=adam with loss.known_only=true"),
    ]
    for ok, message in checks:
        if not ok:
            raise GloError(message)


def absolute_paths(cfg: DictConfig) -> None:
    """Paths in the config become absolute (and ~ is expanded), so what metadata.json stores works from any
    working directory (`glo.evaluate RUN_DIR` rebuilds the dataset from it)."""
    for key in PATHS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str):
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)))


def environment() -> dict[str, str | None]:
    """Package versions and git commit, so a dataset says what made it."""
    packages = {p: version(p) for p in ("glo", "torch", "diffusers", "lightning", "hydra-core", "numpy")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), **packages, "git_commit": commit}


def hparams(cfg: DictConfig) -> dict[str, str | float | int]:
    """The knobs a sweep turns, flat, for TensorBoard's HParams tab."""
    return {"vae": cfg.vae.name, "loss": cfg.loss.name, "known_only": cfg.loss.known_only,
            "mask": HydraConfig.get().runtime.choices.mask,
            "data_size": cfg.data.size,
            **{k: cfg[k] for k in ("optim", "lr", "schedule", "max_steps", "rel_tol", "window", "batch_size",
                                   "precision", "seed")}}


def run(cfg: DictConfig) -> float:
    validate(cfg)
    absolute_paths(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    dataset = instantiate(cfg.data)
    masks = instantiate(cfg.mask)
    if masks:
        masks.check(dataset.ids)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    exporter = next((c for c in callbacks if isinstance(c, LatentExporter)), None)
    if exporter is None:
        raise GloError("callbacks: no glo.export.LatentExporter among them; glo.run exists to export latents")
    precision, reason = resolve_precision(cfg.precision, pick_device(cfg.device))
    if rank_zero_only.rank == 0:  # other DDP ranks start later, inside this run's lock and checks
        held = rundir.lock(exporter.out)  # noqa: F841 (the lock lasts as long as this file stays open)
        rundir.claim(exporter.out, rundir.fingerprint(cfg, dataset.ids, precision), cfg.resume)
        exporter.verify()
    done = exporter.done_ids()
    todo = [i for i, name in enumerate(dataset.ids) if name not in done]
    if done:
        log.info("resuming: %d images already exported, %d to go", len(dataset.ids) - len(todo), len(todo))
    log.info("precision %s (%s)", precision, reason)
    vae = instantiate(cfg.vae).set_speed(cfg.channels_last, cfg.checkpointing, cfg.tile_size)
    module = instantiate(cfg.module, vae=vae, loss=instantiate(cfg.loss), masks=masks, precision=precision)
    exporter.metadata.update(config=OmegaConf.to_container(cfg, resolve=True), vae=vae.info(),
                             precision={"requested": cfg.precision, "used": precision, "reason": reason},
                             machine=machine(),
                             image_size=dataset.size, environment=environment(),
                             skipped=getattr(dataset, "skipped", []), exif_turned=getattr(dataset, "turned", []))
    trainer = instantiate(cfg.trainer, logger=instantiate(cfg.logger), callbacks=callbacks)
    if todo:
        loader = DataLoader(Subset(dataset, todo), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        trainer.predict(module, loader, return_predictions=False)
        if not trainer.is_global_zero:
            return float("nan")  # rank 0 merges, reports and returns the sweep objective
    else:
        exporter.merge()
    missing = set(dataset.ids) - exporter.done_ids()
    if missing:
        raise GloError(f"{exporter.shards}: {len(missing)} image(s) not exported (e.g. '{min(missing)}'); "
                       "run the same command again to compute them")
    s = exporter.summary
    if cfg.report:
        s = evaluate(exporter.out, vae=vae, dataset=dataset)
    if trainer.logger:  # HParams tab: compare the jobs of a sweep side by side
        trainer.logger.log_hyperparams(hparams(cfg), {f"hparams/{k}": s[k] for k in HPARAM_METRICS})
    print(f"glo: {s['num_images']} images, PSNR {s['psnr_initial_mean']:.2f} -> {s['psnr_final_mean']:.2f} dB "
          f"(gain {s['psnr_gain_mean']:+.2f} dB, {s['images_improved']} improved), {s['passes_mean']:.1f} decoder passes, "
          f"{s['images_per_second']:.3f} images/s -> {exporter.out}")
    if "psnr_known_final_mean" in s:
        print(f"glo: masked-image latents, known-region PSNR {s['psnr_known_initial_mean']:.2f} -> "
              f"{s['psnr_known_final_mean']:.2f} dB ({s['known_images_improved']} improved)")
    return s["psnr_gain_mean"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> float:
    with one_line_errors("glo"):
        return run(cfg)


if __name__ == "__main__":
    main()
