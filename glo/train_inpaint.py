"""python -m glo.train_inpaint runs=[DIR,...]: train one of glo.inpaint's small offline UNets on the
latents of masked glo runs (the training itself: glo/train/inpaint.py).

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


class TrainInpaint(Schema):
    """conf/train_inpaint.yaml, typed: what each key means is said there."""

    task: str
    name: str
    runs: Annotated[list[str], Field(min_length=1)]
    latents: Literal["encoder", "glo"]
    kind: Literal["sd_inpaint", "blend"]
    held_out: Annotated[float, Field(gt=0, lt=1)]
    run_dir: str
    export_dir: str
    seed: Seed
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    batch_size: Count
    lr: Positive
    weight_decay: Annotated[float, Field(ge=0)]
    warmup_steps: NonNegative
    checkpoint_every: Count
    flip: bool
    unet: dict[str, Any]
    scheduler: dict[str, Any]
    trainer: dict[str, Any]


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_inpaint")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.train_inpaint"):
        checked(TrainInpaint, cfg)
        from glo.train.inpaint import train

        print(f"glo.train_inpaint: saved to {train(cfg)}")


if __name__ == "__main__":
    hydra_main(main)
