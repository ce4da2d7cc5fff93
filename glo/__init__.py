"""glo: Generative Latent Optimization for Stable Diffusion VAE latents.

`import glo` stays light (no Lightning, no Hydra): the engine and the latents format are plain PyTorch.
"""


class GloError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
