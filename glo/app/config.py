"""A run's config checked and turned into parts: settings refused in one line before anything slow
loads, paths made absolute, the VAE on its device, and what a dataset records about what made it."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError
from pydantic import ConfigDict, Field

from glo import GloError
from glo.app.typed import Count, Device, NonNegative, Schema, Seed, checked, require

if TYPE_CHECKING:
    from glo.method.settings import Settings
    from glo.model.hardware import Speed
    from glo.model.vae import FrozenVAE

B = TypeVar("B")


class Nested(Schema):
    """A config group's node: the keys glo reads here are typed, the rest go to its `_target_`'s
    constructor."""

    model_config = ConfigDict(extra="allow")


class Data(Nested):
    # the VAE downsamples by 8; SSIM's window is 11 px
    size: Annotated[int, Field(ge=16, multiple_of=8)]
    limit: Count | None = None


class Loss(Nested):
    # beyond these the loss under- or overflows fp32 before the engine's relative step sees it
    scale: Annotated[float, Field(ge=1e-12, le=1e12)] = 1.0


class Run(Schema):
    """conf/run.yaml, typed (what each key means is said there). The method's knobs are checked by
    glo.method.settings.Settings, the decoder's switches by glo.model.hardware.Speed (`built`)."""

    task: str
    optim: Any
    lr: Any
    betas: Any
    eps: Any
    anderson: Any
    anchor: Any
    anchor_to: Any
    channel_lr: Any
    coords: Any
    schedule: Any
    warmup_steps: Any
    # every step's loss is kept per image: a budget beyond is a typo
    max_steps: Annotated[int, Field(le=100_000)]
    rel_tol: Any
    window: Any
    precision: Any
    channels_last: Any
    checkpointing: Any
    tile_size: Any
    batch_size: Count
    seed: Seed
    device: Device
    num_workers: NonNegative
    image_every_n_batches: NonNegative
    export: dict[str, Any]
    resume: Literal["auto", "restart"]  # see glo.store.rundir.claim
    report: bool
    vae: dict[str, Any]
    data: Data
    loss: Loss
    mask: dict[str, Any]
    trainer: dict[str, Any]
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any]
    module: dict[str, Any]


HPARAM_METRICS = (
    "psnr_gain_mean",
    "psnr_final_mean",
    "ssim_final_mean",
    "steps_mean",
    "passes_mean",
    "images_per_second",
)


# stored absolute, with ~ expanded
PATHS = ("data.path", "data.processed_data_dir", "mask.path", "vae.path")


def validate(cfg: DictConfig, schema: type[Run] = Run) -> tuple[Settings, Speed]:
    """Reject impossible settings before anything slow is built (unknown keys are Hydra's to
    reject). Returns the engine's settings and the decoder's speed switches, each checked by its own
    class."""
    require(schema, cfg)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    # export=abc under ${export.format}: checked names the setting
    except InterpolationResolutionError:
        missing = []
    if missing:
        raise GloError(
            f"{missing[0]}: must be set (e.g. "
            f"{missing[0]}={'FILE' if missing[0] == 'vae.path' else 'DIR'})"
        )
    for key in PATHS:  # data.path=2024: Hydra reads a folder named with digits as a number
        value = OmegaConf.select(cfg, key)
        if value is not None and not isinstance(value, str):
            raise GloError(
                f"{key}={value!r}: read as a number, not a path; write the folder with a slash "
                f"({key}=./NAME) or in quotes ('{key}=\"NAME\"')"
            )
    checked(schema, cfg)
    if cfg.optim == "gradfree" and cfg.mask.get("known_only"):
        raise GloError(
            "optim=gradfree has no pixel loss to restrict: use optim=adam with mask.known_only=true"
        )
    from glo.method.settings import Settings
    from glo.model.hardware import Speed

    return built(Settings, cfg), built(Speed, cfg)


def built(schema: type[B], cfg: DictConfig) -> B:
    """The engine's Settings or the decoder's Speed from the top-level keys named as their fields:
    each is set once, in conf/run.yaml, and what the engine runs is what the config (and the HParams
    tab) says."""
    return schema(
        **OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, list(schema.model_fields)), resolve=True
        )
    )


def quiet_third_parties() -> None:
    """Lightning's hardware lines and product tip, and a deprecation inside Lightning itself, tell a
    glo user nothing they can act on; glo's own warnings and Lightning's warnings stay."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    # "Received SIGTERM: 15" before glo's own line, which says what is safe
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(
        logging.WARNING
    )
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # diffusers' advice to install accelerate and transformers' to install torchvision: glo needs
    # neither
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers"):
        if name in sys.modules:
            logging.getLogger(name).setLevel(logging.ERROR)


def load_model(cfg: DictConfig, speed: Speed) -> FrozenVAE:
    """The VAE the config names, with its speed switches, on the configured device."""
    from glo.model.hardware import pick_device

    return instantiate(cfg.vae).set_speed(speed).to(pick_device(cfg.device))


def absolute_paths(cfg: DictConfig) -> None:
    """Paths in the config become absolute (and ~ is expanded), so what metadata.json stores works
    from any working directory (`glo.evaluate RUN_DIR` rebuilds the dataset from it)."""
    for key in PATHS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str):
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)))


def environment() -> dict[str, str | None]:
    """Package versions and git commit, so a dataset says what made it."""
    packages = {
        p: version(p) for p in ("glo", "torch", "diffusers", "lightning", "hydra-core", "numpy")
    }
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {"python": platform.python_version(), **packages, "git_commit": commit}


def hparams(cfg: DictConfig) -> dict[str, str | float | int]:
    """The knobs a sweep turns, flat, for TensorBoard's HParams tab."""
    return {
        "vae": cfg.vae.name,
        "loss": cfg.loss.name,
        "known_only": bool(cfg.mask.get("known_only")),
        "mask": HydraConfig.get().runtime.choices.mask,
        "data_size": cfg.data.size,
        **{
            k: cfg[k]
            for k in (
                "optim",
                "lr",
                "schedule",
                "max_steps",
                "rel_tol",
                "window",
                "batch_size",
                "precision",
                "seed",
            )
        },
    }
