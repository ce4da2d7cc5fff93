"""Training the small KL-f8 stand-in VAE that glo ships for offline use (`python -m glo.train_vae`).

A diffusers AutoencoderKL with Stable Diffusion's latent interface (4 channels, downsampling 8) is
trained on random crops of a folder of photos with L1 + a small KL term, as SD's VAE was (without
its GAN and perceptual terms, which this CPU cannot afford). The run directory is fixed by the
config, so the same command resumes from `checkpoints/last.ckpt` after an interruption. At the end
the scaling factor is set to 1 / std of the training latents (how SD's 0.18215 was found) and the
model is written with `save_pretrained` to `export_dir`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from glo import GloError
from glo.data.images import FolderDataset
from glo.data.pixels import check_size, to_tensor
from glo.method.engine import lr_factor
from glo.method.metrics import psnr, ssim
from glo.model.hardware import pick_device, resolve_precision
from glo.report.grids import comparison_grid, error_map

log = logging.getLogger("glo.train_vae")
LIGHTNING_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def trainer_precision(requested: str) -> str:
    """Lightning's precision for `precision`, chosen as glo.run chooses the decoder's: with `auto`,
    bf16 only where the hardware computes it natively (emulated bf16 on an AVX2-only CPU is over
    100x slower than fp32)."""
    precision, reason = resolve_precision(requested, pick_device("auto"))
    log.info("precision %s (%s)", precision, reason)
    return LIGHTNING_PRECISION[precision]


def checkpointed_trainer(
    cfg: DictConfig, out: Path, precision: str, *callbacks: pl.Callback
) -> pl.Trainer:
    """cfg.trainer logging to TensorBoard in `out` and keeping `out`/checkpoints/last.ckpt every
    cfg.checkpoint_every steps, so a killed training resumes from there."""
    return instantiate(
        cfg.trainer,
        precision=precision,
        default_root_dir=str(out),
        logger=pl.loggers.TensorBoardLogger(str(out), name="", version=""),
        callbacks=[
            pl.callbacks.ModelCheckpoint(
                out / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every
            ),
            *callbacks,
        ],
    )


class RandomCrops(Dataset):
    """`length` random crops per epoch from images held in memory, scaled, flipped; item i is
    reproducible."""

    def __init__(
        self, path: str, crop: int, length: int, scale: tuple[float, float], seed: int
    ) -> None:
        check_size(crop, "crop")
        # checks the folder, vets every file
        folder = FolderDataset(path, size=crop, key="data.train")
        self.images = [folder.load(i)[0] for i in range(len(folder))]
        self.crop, self.length, self.scale, self.seed = crop, length, scale, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tensor:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        img = self.images[rng.integers(len(self.images))]
        s = max(rng.uniform(*self.scale), self.crop / min(img.size))
        if s != 1.0:
            img = img.resize(
                (round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC
            )
        x, y = rng.integers(img.width - self.crop + 1), rng.integers(img.height - self.crop + 1)
        img = img.crop((x, y, x + self.crop, y + self.crop))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)


class VAETraining(pl.LightningModule):
    """L1 reconstruction + kl_weight * KL per pixel, AdamW with warm-up and cosine decay.

    fresh_encoder: keep init_from's decoder frozen and train a newly initialized encoder against it,
    so the encoder's training budget alone sets how far its latents are from what the decoder can
    do.
    """

    def __init__(
        self,
        vae: dict,
        lr: float,
        weight_decay: float,
        kl_weight: float,
        warmup_steps: int,
        init_from: str | None,
        fresh_encoder: bool,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if fresh_encoder and not init_from:
            raise GloError(
                "fresh_encoder=true trains a new encoder for an existing decoder: set init_from=DIR"
            )
        self.model = (
            AutoencoderKL.from_pretrained(init_from).train() if init_from else AutoencoderKL(**vae)
        )
        if fresh_encoder:
            new = AutoencoderKL(**self.model.config)
            self.model.encoder, self.model.quant_conv = new.encoder, new.quant_conv
            self.model.decoder.requires_grad_(False)
            self.model.post_quant_conv.requires_grad_(False)

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        posterior = self.model.encode(x).latent_dist
        rec = self.model.decode(posterior.sample()).sample
        l1 = (rec.float() - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + self.hparams.kl_weight * kl
        self.log_dict({"train/l1": l1, "train/kl": kl, "train/loss": loss}, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, dict], batch_idx: int) -> None:
        x = batch[0]
        rec = self.model.decode(self.model.encode(x).latent_dist.mean).sample
        self.log_dict(
            {"val/psnr": psnr(rec, x).mean(), "val/ssim": ssim(rec, x).mean()}, prog_bar=True
        )
        if batch_idx == 0 and self.logger:
            self.logger.experiment.add_image(
                "val/input|reconstruction|error",
                comparison_grid([x, rec, error_map(rec, x)]),
                self.global_step,
            )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad],
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        total, warm = self.trainer.max_steps, self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, "cosine", warm)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class NextEpoch(pl.Callback):
    """New random crops every epoch, still reproducible from the seed."""

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        trainer.train_dataloader.dataset.epoch = trainer.current_epoch


@torch.no_grad()
def latent_std(model: AutoencoderKL, dataset: Dataset, batch_size: int) -> float:
    """Std of posterior samples over a dataset: the inverse of SD's scaling factor."""
    model.eval()
    zs = [
        model.encode(batch[0]).latent_dist.sample()
        for batch in DataLoader(dataset, batch_size=batch_size)
    ]
    return float(torch.cat(zs).std())


def train(cfg: DictConfig) -> Path:
    out = Path(cfg.run_dir)
    precision = trainer_precision(cfg.precision)
    pl.seed_everything(cfg.seed, verbose=False)
    crops = RandomCrops(cfg.data.train, cfg.crop, cfg.crops_per_epoch, tuple(cfg.scale), cfg.seed)
    val = instantiate(cfg.val_data)
    module = VAETraining(
        OmegaConf.to_container(cfg.vae, resolve=True),
        cfg.lr,
        cfg.weight_decay,
        cfg.kl_weight,
        cfg.warmup_steps,
        cfg.init_from,
        cfg.fresh_encoder,
    )
    last = out / "checkpoints" / "last.ckpt"
    trainer = checkpointed_trainer(cfg, out, precision, NextEpoch())
    trainer.fit(
        module,
        DataLoader(
            crops,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            drop_last=True,
            persistent_workers=cfg.num_workers > 0,
        ),
        DataLoader(val, batch_size=cfg.batch_size),
        ckpt_path=str(last) if last.is_file() else None,
    )
    model = module.model
    std = latent_std(model, instantiate(cfg.scale_data), cfg.batch_size)
    model.register_to_config(scaling_factor=round(1.0 / std, 5))
    export = Path(cfg.export_dir)
    model.save_pretrained(export)
    log.info("latent std %.4f -> scaling_factor %.5f; saved to %s", std, 1.0 / std, export)
    return export
