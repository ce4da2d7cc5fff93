"""The stand-in VAE: glo's own small KL-f8 autoencoder with SD's latent interface, its weights beside the code
that trains them. It lets everything run offline; it stands in for SD's VAE, it is not SD's."""
from pathlib import Path

ASSETS = Path(__file__).parent  # weights shipped in the wheel, by directory name (`vae.asset`)
