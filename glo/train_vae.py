"""python -m glo.train_vae: train the stand-in VAE that glo ships (the training itself:
glo/train/vae.py).

Lightning and diffusers are imported only once the settings are checked, so a mistyped one is
refused at once.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import hydra
from omegaconf import DictConfig
from pydantic import Field

from glo.app.cli import hydra_main, one_line_errors
from glo.app.typed import Count, NonNegative, Positive, Schema, Seed, checked


class TrainVAE(Schema):
    """conf/train_vae.yaml, typed: what each key means is said there."""

    task: str
    name: str
    run_dir: str
    export_dir: str
    seed: Seed
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    data: dict[str, str]
    val_data: dict[str, Any]
    scale_data: dict[str, Any]
    vae: dict[str, Any]
    crop: Annotated[int, Field(ge=16, multiple_of=8)]
    scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)]
    crops_per_epoch: Count
    batch_size: Count
    num_workers: NonNegative
    lr: Positive
    weight_decay: Annotated[float, Field(ge=0)]
    kl_weight: Annotated[float, Field(ge=0)]
    warmup_steps: NonNegative
    init_from: str | None
    fresh_encoder: bool
    checkpoint_every: Count
    trainer: dict[str, Any]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_vae")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.train_vae"):
        checked(TrainVAE, cfg)
        from glo.train.vae import train

        train(cfg)


if __name__ == "__main__":
    hydra_main(main)
