"""A run's config checked and turned into parts: settings refused in one line before anything slow loads,
paths made absolute, the VAE on its device, and what a dataset records about what made it."""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from glo import GloError

if TYPE_CHECKING:
    from glo.method.settings import Settings
    from glo.model.hardware import Speed
    from glo.model.vae import FrozenVAE


DEVICES = ("auto", "cpu", "cuda", "mps")


RESUME = ("auto", "restart")  # see glo.store.rundir.claim


HPARAM_METRICS = ("psnr_gain_mean", "psnr_final_mean", "ssim_final_mean", "steps_mean", "passes_mean",
                  "images_per_second")


INTEGERS = ("batch_size", "seed", "num_workers")


PATHS = ("data.path", "data.processed_data_dir", "mask.path", "vae.path")  # stored absolute, with ~ expanded


def validate(cfg: DictConfig) -> tuple[Settings, Speed]:
    """Reject impossible settings before anything slow is built (unknown keys are Hydra's to reject).
    Returns the engine's settings and the decoder's speed switches, each checked by its own class."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise GloError(f"{missing[0]}: must be set (e.g. {missing[0]}={'FILE' if missing[0] == 'vae.path' else 'DIR'})")
    for key in INTEGERS:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int):
            raise GloError(f"{key}={cfg[key]!r}: must be an integer")
    for key in PATHS:  # data.path=2024: Hydra reads a folder named with digits as a number
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, str):
            raise GloError(f"{key}={value!r}: read as a number, not a path; write the folder with a slash "
                           f"({key}=./NAME) or in quotes ('{key}=\"NAME\"')")
    limit = cfg.data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise GloError(f"data.limit={limit!r}: must be an integer >= 1, or null for every image")
    checks = [
        (isinstance(cfg.report, bool), f"report={cfg.report!r}: must be true or false"),
        (cfg.batch_size >= 1, f"batch_size={cfg.batch_size}: must be >= 1"),
        (cfg.num_workers >= 0, f"num_workers={cfg.num_workers}: must be >= 0"),
        (0 <= cfg.seed < 2**32, f"seed={cfg.seed}: must be in [0, 2**32)"),
        (cfg.resume in RESUME, f"resume={cfg.resume}: must be one of {', '.join(RESUME)}"),
        (cfg.device in DEVICES, f"device={cfg.device}: must be one of {', '.join(DEVICES)}"),
        (not (cfg.optim == "gradfree" and cfg.mask.get("known_only")),
         "optim=gradfree has no pixel loss to restrict: use optim=adam with mask.known_only=true"),
    ]
    for ok, message in checks:
        if not ok:
            raise GloError(message)
    return instantiate(cfg.engine), instantiate(cfg.speed)


def quiet_third_parties() -> None:
    """Lightning's hardware lines and product tip, and a deprecation inside Lightning itself, tell a glo user
    nothing they can act on; glo's own warnings and Lightning's warnings stay."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # "Received SIGTERM: 15" before glo's own line, which says what is safe
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def load_model(cfg: DictConfig, speed: Speed) -> FrozenVAE:
    """The VAE the config names, with its speed switches, on the configured device."""
    from glo.model.hardware import pick_device

    return instantiate(cfg.vae).set_speed(speed).to(pick_device(cfg.device))


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
    return {"vae": cfg.vae.name, "loss": cfg.loss.name, "known_only": bool(cfg.mask.get("known_only")),
            "mask": HydraConfig.get().runtime.choices.mask,
            "data_size": cfg.data.size,
            **{k: cfg[k] for k in ("optim", "lr", "schedule", "max_steps", "rel_tol", "window", "batch_size",
                                   "precision", "seed")}}
