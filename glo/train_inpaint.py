"""python -m glo.train_inpaint runs=[DIR,...]: train one of glo.inpaint's small offline UNets on the latents of
masked glo runs (the training itself: glo/standin/inpaint_training.py).

Lightning and diffusers are imported only once Hydra has composed the config, so a mistyped key is refused at once.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from glo.app.cli import hydra_main, one_line_errors


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_inpaint")
def main(cfg: DictConfig) -> None:
    with one_line_errors("glo.train_inpaint"):
        from glo.standin.inpaint_training import train

        print(f"glo.train_inpaint: saved to {train(cfg)}")


if __name__ == "__main__":
    hydra_main(main)
