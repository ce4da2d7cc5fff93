"""Training glo.inpaint's small offline UNets (`python -m glo.train_inpaint`) on the latents of
masked glo runs.

A diffusers UNet2DConditionModel learns to predict the noise DDPM added to a latent (SD's schedule
and objective), conditioned (kind=sd_inpaint, 2C+1 input channels for C-channel latents) on the mask
and the masked image's latent exactly as diffusers' StableDiffusionInpaintPipeline feeds SD's
inpainting UNet; kind=blend (C) is a plain denoiser, which the pipeline keeps outside the hole.
Trained on either conditioning a glo run exports (`latents`), so one UNet knows the encoder's
latents, as SD's does, and one knows glo's. The cross-attention reads a zero condition: no text.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from glo import GloError
from glo.latents import LatentDataset, find_latents
from glo.layout import METADATA
from glo.method.engine import lr_factor
from glo.store.atomic import save_json, save_text
from glo.train.vae import checkpointed_trainer, trainer_precision

log = logging.getLogger("glo.train_inpaint")
KINDS = ("sd_inpaint", "blend")
KEYS = {"encoder": ("initial_latent", "initial_masked_latent"), "glo": ("latent", "masked_latent")}


def split(
    runs: list[str], latents: str, held_out: float
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(train, held-out) tensors {latent, mask, masked_latent} from every run, and the held-out ids:
    the last `held_out` fraction of each run's images (by id), so the split does not depend on the
    order runs are given."""
    if latents not in KEYS:
        raise GloError(f"latents={latents}: choose one of {', '.join(KEYS)}")
    if not 0 < held_out < 1:
        raise GloError(f"held_out={held_out}: a fraction of the images, between 0 and 1")
    parts: dict[str, dict[str, list[Tensor]]] = {"train": {}, "held_out": {}}
    held_ids: list[str] = []
    for run in runs:
        data = LatentDataset(find_latents(run), inpainting=True)
        order = sorted(range(len(data)), key=lambda i: data.ids[i])
        n_held = max(1, math.ceil(held_out * len(order)))
        if n_held >= len(order):
            raise GloError(
                f"{run}: {len(order)} images leave none to train on with held_out={held_out}"
            )
        for part, rows in (("train", order[:-n_held]), ("held_out", order[-n_held:])):
            for i in rows:
                item = data[i]
                got = {
                    "latent": item[KEYS[latents][0]],
                    "mask": item["mask"],
                    "masked_latent": item[KEYS[latents][1]],
                }
                for k, v in got.items():
                    parts[part].setdefault(k, []).append(v)
        held_ids += [f"{run}:{data.ids[i]}" for i in order[-n_held:]]
    train, held = ({k: torch.stack(v) for k, v in parts[p].items()} for p in ("train", "held_out"))
    return train, held, held_ids


def unet_input(unet: UNet2DConditionModel, noisy: Tensor, mask: Tensor, masked: Tensor) -> Tensor:
    """What diffusers' inpainting pipeline feeds the UNet: 2C+1 channels cat([noisy, mask, masked]),
    else noisy."""
    return (
        torch.cat([noisy, mask, masked], 1) if unet.config.in_channels != noisy.shape[1] else noisy
    )


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    z: Tensor,
    mask: Tensor,
    masked: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample MSE of the predicted noise at a random timestep (DDPM's epsilon objective,
    SD's)."""
    noise = torch.randn(z.shape, generator=generator).to(z)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=generator).to(
        z.device
    )
    noisy = scheduler.add_noise(z, noise, t)
    condition = torch.zeros(
        len(z), 1, unet.config.cross_attention_dim, device=z.device, dtype=z.dtype
    )
    pred = unet(unet_input(unet, noisy, mask, masked), t, encoder_hidden_states=condition).sample
    return (pred.float() - noise.float()).square().flatten(1).mean(1)


@torch.no_grad()
def held_out_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    held: dict[str, Tensor],
    seed: int,
    draws: int = 8,
) -> float:
    """The denoising loss on images never trained on, with the same noise and timesteps every time
    it is asked, so an untrained and a trained model are scored on the same draws."""
    was_training = unet.training
    unet.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next(unet.parameters()).device
    losses = [
        denoising_loss(
            unet,
            scheduler,
            *(held[k].to(device) for k in ("latent", "mask", "masked_latent")),
            generator,
        )
        for _ in range(draws)
    ]
    # Lightning keeps each module's mode: training must start in train mode
    unet.train(was_training)
    return float(torch.cat(losses).mean())


class InpaintTraining(pl.LightningModule):
    """DDPM epsilon MSE, AdamW with warm-up and cosine decay, random flips of all inputs
    together."""

    def __init__(
        self,
        unet: dict,
        scheduler: dict,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        flip: bool,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = UNet2DConditionModel(**unet)
        self.scheduler = DDPMScheduler(**scheduler)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        z, mask, masked = batch
        if self.hparams.flip:
            flipped = torch.rand(len(z), device=z.device) < 0.5
            z, mask, masked = (
                torch.where(flipped[:, None, None, None], t.flip(-1), t) for t in (z, mask, masked)
            )
        loss = denoising_loss(self.unet, self.scheduler, z, mask, masked).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.unet.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total, warm = self.trainer.max_steps, self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total, "cosine", warm)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def vae_name(runs: list[str]) -> str:
    """The one VAE the runs' latents come from: a UNet learns one latent space."""
    names = {json.loads((Path(r) / METADATA).read_text())["vae"]["name"] for r in runs}
    if len(names) != 1:
        raise GloError(
            f"runs={runs}: made with {len(names)} VAEs ({', '.join(sorted(names))}); a UNet learns "
            "one latent space: train on runs of one VAE"
        )
    return names.pop()


def train(cfg: DictConfig) -> Path:
    if cfg.kind not in KINDS:
        raise GloError(f"kind={cfg.kind}: must be one of {', '.join(KINDS)}")
    runs = [str(r) for r in cfg.runs]
    out = Path(cfg.run_dir)
    precision = trainer_precision(cfg.precision)
    pl.seed_everything(cfg.seed, verbose=False)
    vae = vae_name(runs)  # runs of two VAEs are refused before any training
    train_set, held, held_ids = split(runs, cfg.latents, cfg.held_out)
    c = int(train_set["latent"].shape[1])  # the runs' latent channels
    unet_config = {
        **OmegaConf.to_container(cfg.unet, resolve=True),
        "out_channels": c,
        "in_channels": c if cfg.kind == "blend" else 2 * c + 1,
        "sample_size": int(train_set["latent"].shape[-1]),
    }
    module = InpaintTraining(
        unet_config,
        OmegaConf.to_container(cfg.scheduler, resolve=True),
        cfg.lr,
        cfg.weight_decay,
        cfg.warmup_steps,
        cfg.flip,
    )
    before = held_out_loss(module.unet, module.scheduler, held, cfg.seed)
    last = out / "checkpoints" / "last.ckpt"
    trainer = checkpointed_trainer(cfg, out, precision)
    data = TensorDataset(*(train_set[k] for k in ("latent", "mask", "masked_latent")))
    loader = DataLoader(
        data,
        batch_size=min(cfg.batch_size, len(data)),
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    made = {
        "runs": runs,
        "latents": cfg.latents,
        "kind": cfg.kind,
        "unet": unet_config,
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
    }
    resume_same(out, made, last.is_file())
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
    module.unet.float()
    after = held_out_loss(module.unet, module.scheduler, held, cfg.seed)
    export = Path(cfg.export_dir)
    # fp16 on disk: half the wheel; glo loads it as fp32
    module.unet.half().save_pretrained(export / "unet")
    module.scheduler.save_pretrained(export / "scheduler")
    save_json(export / "glo.json", {"vae": vae, "latent_channels": c, "latents": cfg.latents})
    result = {
        "runs": runs,
        "vae": vae,
        "latents": cfg.latents,
        "in_channels": unet_config["in_channels"],
        "kind": cfg.kind,
        "steps": trainer.global_step,
        "train_images": len(data),
        "parameters": sum(p.numel() for p in module.unet.parameters()),
        "held_out_ids": held_ids,
        "held_out_loss_untrained": before,
        "held_out_loss_trained": after,
    }
    save_json(out / "train.json", result)
    save_text(export / "README.md", model_card(cfg, result))
    log.info("held-out loss %.4f untrained -> %.4f trained; saved to %s", before, after, export)
    return export


def resume_same(out: Path, made: dict, resuming: bool) -> None:
    """A checkpoint resumes only the training that made it: other runs, latents, kind or UNet is one
    line."""
    record = out / "made.json"
    if resuming and record.is_file():
        before = json.loads(record.read_text())
        changed = [k for k in made if before.get(k) != made[k]]
        if changed:
            raise GloError(
                f"{out}: its checkpoint was trained with other {', '.join(changed)} "
                f"({changed[0]}={before.get(changed[0])}); give another name= or delete {out} to "
                "start over"
            )
    if not resuming or record.is_file():
        save_json(record, made)


def model_card(cfg: DictConfig, r: dict) -> str:
    kind = (
        f"an inpainting UNet ({r['in_channels']} input channels: noisy latent, mask, masked "
        "image's latent), for glo.inpaint's `sd_inpaint` rows"
        if r["kind"] == "sd_inpaint"
        else f"a denoiser ({r['in_channels']} input channels), for glo.inpaint's `blend` row, "
        "where the pipeline keeps the known region"
    )
    return "\n".join(
        [
            f"# {cfg.name}",
            "",
            f"A small diffusers `UNet2DConditionModel` ({r['parameters'] / 1e6:.2f}M parameters, "
            f"fp16 on disk): {kind}. Trained by `python -m glo.train_inpaint` for {r['steps']} "
            f"steps on the {r['latents']} latents of {r['train_images']} images "
            f"({', '.join(Path(x).name for x in r['runs'])}), DDPM epsilon objective on SD's noise "
            "schedule, with a zero text condition.",
            "",
            f"Held-out denoising loss ({len(r['held_out_ids'])} images never trained on): "
            f"{r['held_out_loss_untrained']:.4f} untrained, {r['held_out_loss_trained']:.4f} "
            "trained.",
            "",
            "What it is for: measuring, offline, how glo's latents change diffusers' "
            "StableDiffusionInpaintPipeline's output (python -m glo.inpaint) in vae "
            f"'{r['vae']}''s latent space. What it is not: Stable Diffusion, or a model whose "
            f"holes look plausible; it knows {r['train_images']} photos. Real figures need SD's "
            "own UNets (inpainters=sd).",
            "",
        ]
    )
