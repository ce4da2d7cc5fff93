"""glo: Generative Latent Optimization for Stable Diffusion VAE latents."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class GloError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Print a GloError (also when Hydra's instantiate wrapped it) as one line and exit 1.

    Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, GloError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(1)
