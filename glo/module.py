"""The LightningModule: runs the engine on each predicted batch, logs it, and returns arrays to export."""
from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig
from torch import Tensor

from glo.engine import optimize
from glo.hardware import PRECISIONS, resolve_precision
from glo.losses import PixelLoss
from glo.masks import MaskSource, batch_holes, latent_mask
from glo.metrics import known_psnr, psnr, ssim
from glo.vae import FrozenVAE

OPTIMS = ("adam", "gradfree")


def engine_settings(vae: FrozenVAE, optim: str, lr: float, betas: tuple[float, float], schedule: str,
                    warmup_steps: int, max_steps: int, rel_tol: float, window: int, precision: str) -> dict:
    """The config's knobs as keyword arguments of `engine.optimize`."""
    return dict(lr=lr, betas=tuple(betas), schedule=schedule, warmup_steps=warmup_steps, max_steps=max_steps,
                rel_tol=rel_tol, window=window, autocast=PRECISIONS[precision],
                encode=vae.encode if optim == "gradfree" else None)


def config_settings(vae: FrozenVAE, m: DictConfig) -> dict:
    """engine_settings from a composed glo.run config's `module` block, for tools that skip Lightning;
    `precision=auto` is resolved for the device the VAE is on."""
    precision, _ = resolve_precision(m.precision, next(vae.parameters()).device)
    return engine_settings(vae, m.optim, m.lr, m.betas, m.schedule, m.warmup_steps, m.max_steps, m.rel_tol, m.window,
                           precision)


class GLOModule(pl.LightningModule):
    """Each batch's latents become parameters for its own Adam run; the VAE stays frozen throughout.

    With a mask source, each image also gets the inpainting conditioning: the latent of the masked
    image (hole set to 0, i.e. grey, as diffusers does) is optimized in the same engine run, on the
    known pixels only if `loss.known_only`, and exported with the mask at latent resolution.
    """

    def __init__(self, vae: FrozenVAE, loss: PixelLoss, optim: str, lr: float, betas: tuple[float, float],
                 schedule: str, warmup_steps: int, max_steps: int, rel_tol: float, window: int, precision: str,
                 image_every_n_batches: int, masks: MaskSource | None = None) -> None:
        super().__init__()
        self.vae, self.loss, self.masks = vae, loss, masks
        self.settings = engine_settings(vae, optim, lr, betas, schedule, warmup_steps, max_steps, rel_tol, window,
                                        precision)
        self.image_every = image_every_n_batches
        self.steps_logged = 0
        self.images_logged = 0

    def predict_step(self, batch: tuple[Tensor, dict], batch_idx: int) -> dict[str, np.ndarray]:
        images, meta = batch
        x = images.permute(0, 3, 1, 2).contiguous()  # datasets yield HWC
        n, start = len(x), time.perf_counter()
        target, weight = x, None
        if self.masks:
            hole = batch_holes(self.masks, meta, x.shape[-1]).to(x)
            known = 1 - hole
            target = torch.cat([x, x * known])  # full image, then the masked image
            if self.loss.known_only:  # the full image keeps every pixel; the masked image only its known ones
                weight = torch.cat([torch.ones_like(known), known])
        z0 = self.vae.encode(target)
        with torch.enable_grad():  # Lightning predicts under no_grad; the latents need gradients
            r = optimize(self.vae.decode, z0, target, self.loss, weight=weight, **self.settings, on_step=self._on_step)
        with torch.no_grad():  # the whole batch at once: initial then optimized, full images then masked ones
            decoded0, decoded1 = self.vae.decode(z0), self.vae.decode(r.latents)
        seconds = (time.perf_counter() - start) / n
        x0, x1 = decoded0[:n], decoded1[:n]
        out = {
            "ids": np.array(meta["id"], dtype=str),
            "sources": np.array(meta["source"], dtype=str),
            "original_size": torch.stack([meta["height"], meta["width"]], 1).cpu().numpy(),
            "latents": r.latents[:n].float().cpu().numpy(),
            "initial_latents": z0[:n].float().cpu().numpy(),
            "steps": r.steps[:n].numpy(),
            "passes": r.passes[:n].numpy(),
            "initial_loss": r.initial_loss[:n].numpy(),
            "final_loss": r.final_loss[:n].numpy(),
            "psnr_initial": psnr(x0, x).cpu().numpy(),
            "psnr_final": psnr(x1, x).cpu().numpy(),
            "ssim_initial": ssim(x0, x).cpu().numpy(),
            "ssim_final": ssim(x1, x).cpu().numpy(),
            "converged": r.converged[:n].numpy(),
            "nonfinite": r.nonfinite[:n].numpy(),
            "loss_curves": r.loss_curves[:n].numpy(),
        }
        if self.masks:
            out.update({
                "masks": hole[:, 0].bool().cpu().numpy(),
                "latent_masks": latent_mask(hole).float().cpu().numpy(),
                "masked_latents": r.latents[n:].float().cpu().numpy(),
                "initial_masked_latents": z0[n:].float().cpu().numpy(),
                "masked_steps": r.steps[n:].numpy(),
                "masked_passes": r.passes[n:].numpy(),
                "psnr_known_initial": known_psnr(decoded0[n:], x, known).cpu().numpy(),
                "psnr_known_final": known_psnr(decoded1[n:], x, known).cpu().numpy(),
            })
        out["seconds"] = np.full(n, seconds)
        self._log_images(out, x, x0, x1, batch_idx)
        return out

    def _on_step(self, step: int, active: int, loss: float) -> None:
        if self.logger:
            self.logger.experiment.add_scalar("loss/batch_mean", loss, self.steps_logged)
            self.logger.experiment.add_scalar("loss/active_samples", active, self.steps_logged)
        self.steps_logged += 1
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, TQDMProgressBar) and bar.predict_progress_bar is not None:
            bar.predict_progress_bar.set_postfix(step=step, active=active, loss=f"{loss:.4g}")

    def _log_images(self, out: dict[str, np.ndarray], x: Tensor, x0: Tensor, x1: Tensor, batch_idx: int) -> None:
        if not self.logger:
            return
        tb = self.logger.experiment
        for i in range(len(x)):
            k = self.images_logged + i
            tb.add_scalar("image/final_loss", out["final_loss"][i], k)
            tb.add_scalar("image/psnr_final", out["psnr_final"][i], k)
            tb.add_scalar("image/psnr_gain", out["psnr_final"][i] - out["psnr_initial"][i], k)
            tb.add_scalar("image/steps", out["steps"][i], k)
        self.images_logged += len(x)
        if self.image_every and batch_idx % self.image_every == 0:
            tb.add_image("grid/input|initial|optimized|error", comparison_grid([x, x0, x1, error_map(x1, x)]), batch_idx)


def error_map(pred: Tensor, target: Tensor) -> Tensor:
    """|pred - target| averaged over colour, x4 so small errors show, as a grey image in [-1,1]."""
    return ((pred - target).abs().mean(1, keepdim=True) * 4 - 1).clamp(-1, 1).expand_as(target)


def comparison_grid(panels: list[Tensor], rows: int = 4) -> Tensor:
    """(3,H*rows,W*len(panels)) in [0,1]: the first `rows` images of each panel side by side, one row each."""
    grid = torch.cat([p[:rows].detach().float().clamp(-1, 1).cpu() for p in panels], dim=3)
    return (torch.cat(list(grid), dim=1) + 1) / 2
