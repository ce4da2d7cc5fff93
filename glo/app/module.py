"""The LightningModule: fits each predicted batch, logs it, and returns the arrays to export."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from glo.data.masks import MaskSource, batch_holes
from glo.method.fit import fit_batch
from glo.method.losses import PixelLoss
from glo.method.settings import Settings
from glo.model.vae import FrozenVAE
from glo.report.grids import comparison_grid, error_map


class GLOModule(pl.LightningModule):
    """Lightning's concerns only: the predict loop calls `fit_batch` per batch, logs it, and hands
    the arrays to the exporter. The algorithm is in glo.method.engine, the per-batch work in
    glo.method.fit."""

    def __init__(
        self,
        vae: FrozenVAE,
        loss: PixelLoss,
        settings: Settings,
        image_every_n_batches: int,
        masks: MaskSource | None = None,
    ) -> None:
        super().__init__()
        self.vae, self.loss, self.settings, self.masks = vae, loss, settings, masks
        self.image_every = image_every_n_batches
        self.steps_logged = 0
        self.images_logged = 0

    def predict_step(self, batch: tuple[Tensor, dict], batch_idx: int) -> dict[str, np.ndarray]:
        x, meta = batch
        start = time.perf_counter()
        holes = batch_holes(self.masks, meta, x.shape[-1]).to(x) if self.masks else None
        known_only = self.masks is not None and self.masks.known_only
        f = fit_batch(self.vae, x, self.settings, self.loss, holes, known_only, self._on_step)
        out = {
            "ids": np.array(meta["id"], dtype=str),
            "sources": np.array(meta["source"], dtype=str),
            "source_sha256": np.array(meta["sha256"], dtype=str),
            **(
                {"mask_sha256": np.array([self.masks.digests[i] for i in meta["id"]], dtype=str)}
                if self.masks is not None and self.masks.digests
                else {}
            ),
            "original_size": torch.stack([meta["height"], meta["width"]], 1).cpu().numpy(),
            **f.arrays,
            "seconds": np.full(len(x), (time.perf_counter() - start) / len(x)),
            # whose seconds these are (DDP)
            "rank": np.full(len(x), self.global_rank, dtype=np.int32),
        }
        self._log_images(out, x, f.initial, f.final, batch_idx)
        return out

    def _on_step(self, step: int, active: int, loss: float) -> None:
        if self.logger:
            self.logger.experiment.add_scalar("loss/batch_mean", loss, self.steps_logged)
            self.logger.experiment.add_scalar("loss/active_samples", active, self.steps_logged)
        self.steps_logged += 1
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, ImageProgressBar):
            bar.show_step(step, active, loss)

    def _log_images(
        self, out: dict[str, np.ndarray], x: Tensor, x0: Tensor, x1: Tensor, batch_idx: int
    ) -> None:
        if not self.logger:
            return
        tb = self.logger.experiment
        for i in range(len(x)):
            k = self.images_logged + i
            tb.add_scalar("image/final_loss", out["final_loss"][i], k)
            tb.add_scalar("image/psnr_final", out["psnr_final"][i], k)
            tb.add_scalar("image/psnr_gain", out["psnr_final"][i] - out["psnr_initial"][i], k)
            tb.add_scalar("image/steps", out["steps"][i], k)
            tb.add_scalar("drift/distance", out["drift_distance"][i], k)
            tb.add_scalar("drift/hf_share", out["hf_share_final"][i], k)
            tb.add_scalar("drift/reencode_error", out["reencode_error_final"][i], k)
        self.images_logged += len(x)
        if self.image_every and batch_idx % self.image_every == 0:
            grid = comparison_grid([x, x0, x1, error_map(x1, x)])
            tb.add_image("grid/input|initial|optimized|error", grid, batch_idx)


class ImageProgressBar(ProgressBar):
    """Lightning's progress bar slot, counting images rather than batches: done/total, images/s,
    time left, and the current batch's optimizer step (rich draws it; on a non-terminal it prints
    only the end state)."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        self.progress = Progress(
            TextColumn("glo"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[step]}"),
            console=Console(stderr=True),
        )
        loaders = trainer.predict_dataloaders
        # this rank's
        total = sum(len(d.sampler) for d in (loaders if isinstance(loaders, list) else [loaders]))
        self.task = self.progress.add_task("", total=total, rate="", step="")
        self.progress.start()

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        module: pl.LightningModule,
        outputs: dict,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, len(outputs["ids"]))
            speed = self.progress.tasks[0].speed
            self.progress.update(self.task, rate=f"{speed:.3f} images/s" if speed else "", step="")

    def on_predict_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def show_step(self, step: int, active: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, step=f"step {step}, {active} active, loss {loss:.4g}")
