"""python -m glo.train_vae: train the stand-in VAE that glo ships (the training itself: glo/standin/training.py).

Lightning and diffusers are imported only once Hydra has composed the config, so a mistyped key is refused at once.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from glo.app.cli import hydra_main, one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_vae")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.train_vae"):
        from glo.standin.training import train

        train(cfg)


if __name__ == "__main__":
    hydra_main(main)
