"""glo: Generative Latent Optimization for Stable Diffusion VAE latents.

`import glo` stays light (no Lightning, no Hydra): the engine and the latents format are plain PyTorch.
"""
import math


class GloError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Stopped(GloError):
    """A run stopped on request (SIGTERM) with everything finished so far intact."""

    exit_code = 143  # 128 + SIGTERM, what shells and schedulers expect


def is_number(value: object, kind: type = float) -> bool:
    """A config value that is a finite real number (or an integer, for kind=int): YAML's true is not 1, and no
    setting of glo means anything at inf or nan (1e400 reads as inf)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
            and math.isfinite(value))
