"""python -m glo.run: build everything the config names, optimize every image's latent, export the
dataset.

Returns the mean PSNR gain, so Hydra sweepers can maximize it over a --multirun. Importing this
module loads neither torch nor Lightning, so Hydra refuses a mistyped setting in about a second.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from glo import GloError, Stopped
from glo.app.cli import StopOnSigterm, hydra_main, one_line_errors
from glo.app.config import (
    HPARAM_METRICS,
    absolute_paths,
    environment,
    hparams,
    load_model,
    quiet_third_parties,
    validate,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from glo.app.export import LatentExporter
    from glo.model.hardware import Speed
    from glo.model.vae import FrozenVAE


def build(cfg: DictConfig) -> tuple[Any, Any, list[Any], LatentExporter]:
    """The data, masks and callbacks the config names, masks vetted against every image before any
    work."""
    from glo.app.export import LatentExporter

    dataset, masks = instantiate(cfg.data), instantiate(cfg.mask)
    if masks:
        masks.check(dataset.originals())
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    exporter = next((c for c in callbacks if isinstance(c, LatentExporter)), None)
    if exporter is None:
        raise GloError(
            "callbacks: no glo.app.export.LatentExporter among them; glo.run exists to export "
            "latents"
        )
    return dataset, masks, callbacks, exporter


def claim(
    cfg: DictConfig, dataset: Any, masks: Any, exporter: LatentExporter, precision: str
) -> tuple[Any, list[int]]:
    """Lock the run directory, refuse one of other settings, and list the images still to do: the
    lock (held as long as the returned file stays open) and their dataset positions. Other DDP ranks
    start later, inside this run's lock and checks."""
    from lightning.pytorch.utilities import rank_zero_only

    from glo.store import rundir

    held = None
    if rank_zero_only.rank == 0:
        held = rundir.lock(exporter.out)
        rundir.claim(exporter.out, rundir.fingerprint(cfg, dataset.ids, precision), cfg.resume)
        exporter.clear_stop()
        exporter.verify(dataset.digests(), masks.digests if masks else None)
    done = exporter.done_ids()
    todo = [i for i, name in enumerate(dataset.ids) if name not in done]
    if todo and rank_zero_only.rank == 0:
        rundir.unpublish(exporter.out)
    return held, todo


def load_checked(
    cfg: DictConfig,
    speed: Speed,
    trainer: pl.Trainer,
    todo: int,
    dataset: Any,
    masked: bool,
    exporter: LatentExporter,
    precision: str,
) -> tuple[FrozenVAE, int]:
    """The VAE and the largest batch a process will decode, once a run that cannot finish is refused
    in one line: fewer images than processes, rows RAM cannot hold, a batch the device cannot
    hold."""
    from glo.model.memory import check_memory, check_rows

    processes = trainer.num_devices * trainer.num_nodes
    if 0 < todo < processes:  # Lightning's sampler gives every process at least one image, or fails
        raise GloError(
            f"{exporter.out}: {todo} image(s) to do for {processes} processes; run the same "
            "command with trainer.devices=1 trainer.num_nodes=1 to finish them (what is done is "
            "kept)"
        )
    batch = min(cfg.batch_size, math.ceil(todo / processes))
    channels = OmegaConf.select(cfg, "vae.latent_channels") or OmegaConf.select(
        cfg, "vae.config.latent_channels"
    )
    # before the VAE loads: with the channels its config states, else 4 (the fewest: a lower bound)
    rows_fit = partial(
        check_rows, cfg.max_steps, len(dataset.ids), batch, dataset.size, masked, exporter.format
    )
    if todo:
        rows_fit(channels or 4)
    vae = load_model(cfg, speed)
    if cfg.anchor and cfg.anchor_to == "posterior" and not vae.has_posterior:
        raise GloError(
            f"anchor_to=posterior: vae '{vae.name}' has a deterministic encoder (no posterior); "
            "use anchor_to=z0"
        )
    if todo:
        if vae.latent_channels != channels:
            rows_fit(vae.latent_channels)
        # Lightning's local rank: torchrun's and its own LOCAL_RANK, or SLURM_LOCALID under srun
        check_memory(
            speed, vae, dataset.size, precision, batch, trainer.num_devices, trainer.local_rank
        )
    return vae, batch


def predict(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    loader: Any,
    speed: Speed,
    batch: int,
    size: int,
) -> None:
    """Fit every batch; running out of memory is one line naming the switches that resume after the
    images done."""
    from glo.model.memory import memory_line, out_of_memory

    try:
        trainer.predict(module, loader, return_predictions=False)
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not out_of_memory(e):
            raise
        first = str(e).splitlines()[0]
        why = (
            f"out of memory on {module.vae.device} fitting {batch} image(s) of {size} px ({first})"
        )
        switches = [f"batch_size={batch // 2}"] * (batch > 1) + ["checkpointing=true"] * (
            not speed.checkpointing
        )
        raise GloError(memory_line(why, switches, size // 2)) from None


def say_result(s: dict[str, Any], out: Any) -> None:
    """The run's last lines: the gain, and what a mean alone would hide."""
    print(
        f"glo: {s['num_images']} images, PSNR {s['psnr_initial_mean']:.2f} -> "
        f"{s['psnr_final_mean']:.2f} dB (gain {s['psnr_gain_mean']:+.2f} dB, "
        f"{s['images_improved']} improved), {s['passes_mean']:.1f} decoder passes, "
        f"{s['images_per_second']:.3f} images/s -> {out}"
    )
    if 2 * s["nonfinite"] > s["num_images"]:  # a gain of +0.00 dB alone would not say why
        print(
            f"glo: warning: {s['nonfinite']} of {s['num_images']} images met a non-finite loss and "
            "kept their best latent (at worst the encoder's): lower lr, or run with "
            "precision=fp32",
            file=sys.stderr,
        )
    if "psnr_known_final_mean" in s:
        holes = s.get("images_without_known_pixels")
        note = f"; {holes} image(s) with no known pixel left out" if holes else ""
        print(
            f"glo: masked-image latents, known-region PSNR {s['psnr_known_initial_mean']:.2f} -> "
            f"{s['psnr_known_final_mean']:.2f} dB ({s['known_images_improved']} improved{note})"
        )


def run(cfg: DictConfig) -> float:
    with StopOnSigterm() as stop:
        return _run(cfg, stop)


def _run(cfg: DictConfig, stop: StopOnSigterm) -> float:
    settings, speed = validate(cfg)
    # Imported only once the settings are valid: Lightning, diffusers and torchmetrics take several
    # seconds to import, and a mistyped setting should be refused at once
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, Subset

    from glo.model.hardware import machine, pick_device, resolve_precision
    from glo.report.evaluation import evaluate

    absolute_paths(cfg)
    pl.seed_everything(cfg.seed, verbose=False)
    dataset, masks, callbacks, exporter = build(cfg)
    stop.exporter = exporter
    precision, reason = resolve_precision(cfg.precision, pick_device(cfg.device))
    # the lock lasts while `held` is open
    held, todo = claim(cfg, dataset, masks, exporter, precision)  # noqa: F841
    done = len(dataset.ids) - len(todo)
    quiet_third_parties()
    # logger=none or ~logger: no event files
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks)
    vae, batch = load_checked(
        cfg, speed, trainer, len(todo), dataset, bool(masks), exporter, precision
    )
    resumed = f" ({done} already exported)" if done else ""
    if trainer.is_global_zero:
        print(
            f"glo: VAE {vae.name} ({vae.source}) on {vae.device}, precision {precision} "
            f"({reason}); {len(todo)} of {len(dataset.ids)} images to do{resumed} -> "
            f"{exporter.out}",
            flush=True,
        )
    module = instantiate(
        cfg.module,
        vae=vae,
        loss=instantiate(cfg.loss),
        masks=masks,
        settings=settings.replace(precision=precision),
    )
    exporter.metadata.update(
        config=OmegaConf.to_container(cfg, resolve=True),
        vae=vae.info(),
        precision={"requested": cfg.precision, "used": precision, "reason": reason},
        machine=machine(),
        image_size=dataset.size,
        environment=environment(),
        skipped=getattr(dataset, "skipped", []),
        exif_turned=getattr(dataset, "turned", []),
    )
    if todo:
        loader = DataLoader(
            Subset(dataset, todo), batch_size=cfg.batch_size, num_workers=cfg.num_workers
        )
        predict(trainer, module, loader, speed, batch, dataset.size)
        if exporter.signalled:  # during the merge, which the exporter's handler let finish
            raise Stopped(exporter.stopped("by SIGTERM during the merge"))
        if not trainer.is_global_zero:
            return float("nan")  # rank 0 merges, reports and returns the sweep objective
    else:
        exporter.merge()
    missing = set(dataset.ids) - exporter.done_ids()
    if missing:
        raise GloError(
            f"{exporter.shards}: {len(missing)} image(s) not exported (e.g. '{min(missing)}'); run "
            "the same command again to compute them"
        )
    s = exporter.summary
    if cfg.report:
        s = evaluate(exporter.out, vae=vae, dataset=dataset)
    if trainer.logger:  # HParams tab: compare the jobs of a sweep side by side
        trainer.logger.log_hyperparams(hparams(cfg), {f"hparams/{k}": s[k] for k in HPARAM_METRICS})
        # predict closed the writer and logging reopened it: finalize flushes it, or the HParams
        # events may die with the process
        trainer.logger.finalize("success")
    say_result(s, exporter.out)
    return s["psnr_gain_mean"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> float:
    with one_line_errors("glo"):
        return run(cfg)


if __name__ == "__main__":
    hydra_main(main)
