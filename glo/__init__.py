"""glo: Generative Latent Optimization for Stable Diffusion VAE latents."""
from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


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


class WritableOutputDir(Callback):
    """A Hydra callback: an output directory that cannot be created or written is one line, before Hydra's
    own mkdir would end the run with a traceback. Hooks into `hydra.callbacks` of every entry point's config."""

    def __init__(self, prog: str) -> None:
        self.prog = prog

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    def _check(self, path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            print(f"{self.prog}: error: output directory {path}: cannot write there ({e.strerror or e})",
                  file=sys.stderr)
            sys.exit(1)
