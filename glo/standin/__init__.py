"""glo's own shipped weights, each folder with its model card: the stand-in VAE (a small KL-f8
autoencoder with SD's latent interface, not SD's), its family, and the offline inpainting UNets.
`glo.train_vae` and `glo.train_inpaint` made them (glo/train)."""

from pathlib import Path

ASSETS = Path(__file__).parent  # by directory name (`vae.asset`, an inpainter's `asset`)
