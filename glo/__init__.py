"""glo: Generative Latent Optimization for Stable Diffusion VAE latents."""


class GloError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
