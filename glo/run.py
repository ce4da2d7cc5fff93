"""python -m glo.run: build everything the config names, optimize every image's latent, export the dataset.

Returns the mean PSNR gain, so Hydra sweepers can maximize it over a --multirun. Importing this module loads
neither torch nor Lightning, so Hydra refuses a mistyped setting in about a second.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import signal
import subprocess
import sys
import warnings
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from glo import GloError, Stopped
from glo.cli import hydra_main, one_line_errors

if TYPE_CHECKING:
    from glo.engine import Settings
    from glo.export import LatentExporter
    from glo.hardware import Speed
    from glo.vae import FrozenVAE

DEVICES = ("auto", "cpu", "cuda", "mps")
RESUME = ("auto", "restart")  # see glo.rundir.claim
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
    from glo.vae import pick_device

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


def memory_line(why: str, switches: list[str], smaller: int) -> str:
    """Out of memory: what to change. A smaller batch and checkpointing change memory, not the method (they are
    not in the fingerprint), so the same directory resumes after the finished images; a smaller size changes the
    results. tile_size is not offered: without checkpointing it doubled the stand-in's peak memory at 1024 px."""
    resume = f"run the same command with {' '.join(switches)} to resume after them, or " if switches else ""
    return f"{why}; the images finished are kept: {resume}start a new directory with data.size={smaller} or less"


def check_memory(speed: Speed, vae: FrozenVAE, size: int, precision: str, batch: int, processes: int,
                 local_rank: int = 0) -> None:
    """Refuse a batch the device cannot hold before computing anything: where the kernel's OOM killer acts first,
    such a run is killed without a word (at 8192 px the stand-in ran 7 minutes first). The estimate is what
    autograd keeps, from probes at 64 and 128 px: a lower bound, so a run that fits in memory is never refused,
    and a switch is offered unless even its lower bound is too much; one that fits with little to spare is run with
    a warning. batch: the largest batch this process will decode (fewer images may be left than batch_size, and
    halving batch_size would change nothing). local_rank: this process's rank on its machine; rank 0 warns for all."""
    from glo.hardware import PRECISIONS, available_memory, decode_memory

    free = available_memory(vae.device)
    if free is None:
        return
    share = processes if vae.device.type == "cpu" else 1  # this machine's processes share its RAM
    area, dtype = (size / 64) ** 2, PRECISIONS[precision]
    fixed, per_image = decode_memory(vae, dtype)
    need = (fixed + per_image * area * batch) * share
    why = (f"{batch} image(s) of {size} px need at least {need / 2**30:.1f} GiB on {vae.device} for the "
           f"decoder's backward, and {free / 2**30:.1f} GiB is available")
    if need <= free:
        # Peak RSS measured here (bf16: SD VAE architecture at 512 px, stand-in at 1024 px; Intel Xeon, 2026-11-27)
        # was 1.58-1.63x the count without checkpointing and 2.34-3.39x with it, interpreter and model included;
        # less the 778 MiB the SD run held before its first image (free is read after that), at most 2.66x
        if 3 * need > free and local_rank == 0:  # DDP: once per machine, not per rank
            hint = "; checkpointing=true needs less" if not speed.checkpointing else ""
            logging.getLogger("glo").warning("%s: the count is a lower bound, so the run may still run out of memory "
                                             "(on a CPU the kernel then ends it without a message)%s", why, hint)
        return
    room = free / share - fixed  # what the images may take
    switches = [f"batch_size={int(room // (per_image * area))}"] if room >= per_image * area else []
    if not speed.checkpointing:
        vae.model.enable_gradient_checkpointing()
        fixed_ckpt, per_image_ckpt = decode_memory(vae, dtype)
        vae.model.disable_gradient_checkpointing()
        if (fixed_ckpt + per_image_ckpt * area * batch) * share <= free:
            switches.append("checkpointing=true")
    smaller = max(8, int(64 * (max(room, 0) / (per_image * batch)) ** 0.5) // 8 * 8)
    raise GloError(memory_line(why, switches, smaller))


def check_rows(max_steps: int, images: int, batch: int, size: int, masked: bool, fmt: str) -> None:
    """Refuse a run whose exported rows RAM cannot hold, before computing anything: each image keeps a loss curve
    of max_steps floats (the engine holds a batch's, masked images included; an NPZ merge holds every row twice,
    list and concatenation; HDF5 merges shard by shard), so max_steps=1000000000 was killed by the kernel without
    a word. Counted: curves and the latent-shaped columns, in float32; a lower bound, like check_memory's."""
    import torch

    from glo.hardware import available_memory

    free = available_memory(torch.device("cpu"))  # rows live on the CPU wherever the latents are fitted
    if free is None:
        return
    rows = 2 if masked else 1  # the full image and the masked one are fitted side by side
    row = 4 * (max_steps + rows * 2 * 4 * (size // 8) ** 2)  # curve + latents and the encoder's, per row
    need = max(4 * max_steps * rows * batch, (2 * images if fmt == "npz" else batch) * row)
    if need <= free:
        return
    hdf5 = "; export.format=hdf5 merges shard by shard" if fmt == "npz" and batch * row <= free else ""
    raise GloError(f"max_steps={max_steps}, {images} image(s) of {size} px: their loss curves and latents need at "
                   f"least {need / 2**30:.1f} GiB of RAM, and {free / 2**30:.1f} GiB is available; lower max_steps "
                   f"(the stopping rule ends an image once its loss stops changing){hdf5}")


class StopOnSigterm:
    """SIGTERM ends glo.run in one line, exit 143, wherever it lands. Inside trainer.predict Lightning's handler is
    installed and calls this one after its own: there the batch in flight is finished and LatentExporter stops
    after it, so this one does nothing. Outside it (imports, checks, loading the VAE, the report) the run stops at
    once: everything glo writes is written whole or not at all."""

    def __init__(self) -> None:
        self.exporter: LatentExporter | None = None  # set once known: what is safe, and where

    def __enter__(self) -> StopOnSigterm:
        self.previous = signal.signal(signal.SIGTERM, self)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def __call__(self, signum: int, frame: object) -> None:
        if signal.getsignal(signal.SIGTERM) is not self:  # called by Lightning's, which lets the batch finish
            return
        raise Stopped(self.exporter.stopped("by SIGTERM") if self.exporter else "stopped by SIGTERM before any work")


def run(cfg: DictConfig) -> float:
    with StopOnSigterm() as stop:
        return _run(cfg, stop)


def _run(cfg: DictConfig, stop: StopOnSigterm) -> float:
    settings, speed = validate(cfg)
    # Imported only once the settings are valid: Lightning, diffusers and torchmetrics take several seconds to
    # import, and a mistyped setting should be refused at once
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_only
    from torch.utils.data import DataLoader, Subset

    from glo import rundir
    from glo.evaluate import evaluate
    from glo.export import LatentExporter
    from glo.hardware import machine, out_of_memory, resolve_precision
    from glo.vae import pick_device

    absolute_paths(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    dataset = instantiate(cfg.data)
    masks = instantiate(cfg.mask)
    if masks:
        masks.check(dataset.originals())
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    exporter = next((c for c in callbacks if isinstance(c, LatentExporter)), None)
    if exporter is None:
        raise GloError("callbacks: no glo.export.LatentExporter among them; glo.run exists to export latents")
    stop.exporter = exporter
    precision, reason = resolve_precision(cfg.precision, pick_device(cfg.device))
    if rank_zero_only.rank == 0:  # other DDP ranks start later, inside this run's lock and checks
        held = rundir.lock(exporter.out)  # noqa: F841 (the lock lasts as long as this file stays open)
        rundir.claim(exporter.out, rundir.fingerprint(cfg, dataset.ids, precision), cfg.resume)
        exporter.verify(dataset.digests(), masks.digests if masks else None)
    done = exporter.done_ids()
    todo = [i for i, name in enumerate(dataset.ids) if name not in done]
    if todo and rank_zero_only.rank == 0:
        rundir.unpublish(exporter.out)
    quiet_third_parties()
    logger = instantiate(cfg.logger) if cfg.get("logger") else False  # logger=none or ~logger: no event files
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    processes = trainer.num_devices * trainer.num_nodes
    if 0 < len(todo) < processes:  # Lightning's sampler gives every process at least one image, or fails
        raise GloError(f"{exporter.out}: {len(todo)} image(s) to do for {processes} processes; run the same command "
                       "with trainer.devices=1 trainer.num_nodes=1 to finish them (what is done is kept)")
    batch = min(cfg.batch_size, math.ceil(len(todo) / processes))  # the largest batch a process will decode
    if todo:
        check_rows(cfg.max_steps, len(dataset.ids), batch, dataset.size, bool(masks), exporter.format)
    vae = load_model(cfg, speed)
    if todo:
        # Lightning's local rank: torchrun's and its own LOCAL_RANK, or SLURM_LOCALID under srun
        check_memory(speed, vae, dataset.size, precision, batch, trainer.num_devices, trainer.local_rank)
    resumed = f" ({len(dataset.ids) - len(todo)} already exported)" if done else ""
    if rank_zero_only.rank == 0:
        print(f"glo: VAE {vae.name} ({vae.source}) on {vae.device}, precision {precision} ({reason}); "
              f"{len(todo)} of {len(dataset.ids)} images to do{resumed} -> {exporter.out}", flush=True)
    module = instantiate(cfg.module, vae=vae, loss=instantiate(cfg.loss), masks=masks,
                         settings=replace(settings, precision=precision))
    exporter.metadata.update(config=OmegaConf.to_container(cfg, resolve=True), vae=vae.info(),
                             precision={"requested": cfg.precision, "used": precision, "reason": reason},
                             machine=machine(),
                             image_size=dataset.size, environment=environment(),
                             skipped=getattr(dataset, "skipped", []), exif_turned=getattr(dataset, "turned", []))
    if todo:
        loader = DataLoader(Subset(dataset, todo), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        try:
            trainer.predict(module, loader, return_predictions=False)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not out_of_memory(e):
                raise
            why = (f"out of memory on {vae.device} fitting {batch} image(s) of {dataset.size} px "
                   f"({str(e).splitlines()[0]})")
            switches = [f"batch_size={batch // 2}"] * (batch > 1) + ["checkpointing=true"] * (not speed.checkpointing)
            raise GloError(memory_line(why, switches, dataset.size // 2)) from None
        if trainer.received_sigterm:  # during the merge, which Lightning's handler let finish
            raise Stopped(exporter.stopped("by SIGTERM during the merge"))
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
        # Lightning closed its writer when predict ended; logging reopened it, and its writer thread dies with
        # the process: without this the HParams events were sometimes lost
        trainer.logger.finalize("success")
    print(f"glo: {s['num_images']} images, PSNR {s['psnr_initial_mean']:.2f} -> {s['psnr_final_mean']:.2f} dB "
          f"(gain {s['psnr_gain_mean']:+.2f} dB, {s['images_improved']} improved), "
          f"{s['passes_mean']:.1f} decoder passes, {s['images_per_second']:.3f} images/s -> {exporter.out}")
    if 2 * s["nonfinite"] > s["num_images"]:  # a gain of +0.00 dB alone would not say why
        print(f"glo: warning: {s['nonfinite']} of {s['num_images']} images met a non-finite loss and kept their best "
              "latent (at worst the encoder's): lower lr, or run with precision=fp32", file=sys.stderr)
    if "psnr_known_final_mean" in s:
        holes = s.get("images_without_known_pixels")
        note = f"; {holes} image(s) with no known pixel left out" if holes else ""
        print(f"glo: masked-image latents, known-region PSNR {s['psnr_known_initial_mean']:.2f} -> "
              f"{s['psnr_known_final_mean']:.2f} dB ({s['known_images_improved']} improved{note})")
    return s["psnr_gain_mean"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> float:
    with one_line_errors("glo"):
        return run(cfg)


if __name__ == "__main__":
    hydra_main(main)
