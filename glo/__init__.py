"""glo: Generative Latent Optimization for Stable Diffusion VAE latents.

`import glo` stays light (no Lightning, no Hydra): the engine and the latents format are plain
PyTorch.
"""

import math
import os
import signal
import sys
from types import FrameType
from typing import NoReturn


class GloError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class Stopped(GloError):
    """A run stopped on request (SIGTERM) with everything finished so far intact."""

    exit_code = 143  # 128 + SIGTERM, what shells and schedulers expect


def is_number(value: object, kind: type = float) -> bool:
    """A config value that is a finite real number (or an integer, for kind=int): YAML's true is not
    1, and no setting of glo means anything at inf or nan (1e400 reads as inf)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float) if kind is float else int)
        and math.isfinite(value)
    )


def _tool() -> str | None:
    """The glo tool this process runs as (`python -m glo.X`), or None when glo is imported as a
    library."""
    argv = getattr(sys, "orig_argv", [])
    name = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else ""
    return ("glo" if name == "glo.run" else name) if name.startswith("glo.") else None


def first_line(error: BaseException) -> str:
    """glo's own line: OmegaConf appends `full_key:` and `object_type=` lines to an error raised
    inside it."""
    return (str(error).splitlines() or [""])[0]


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def stop_here(error: BaseException, frame: FrameType | None) -> NoReturn:
    """Raise a signal's `error` where it landed, once the tool's own error handling runs
    (`working`). Before it (Hydra composing, which catches Exception) or inside an import (which may
    catch it, or run under C++ that aborts on it: torch's pybind11), say its line and exit at once:
    nothing is being written there."""
    if TOOL and (not working or _importing(frame)):
        _last_line(type(error), error, None)
    raise error


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    stop_here(Stopped("stopped by SIGTERM; every file written is whole"), frame)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global interrupted
    interrupted = True
    stop_here(KeyboardInterrupt(), frame)


def _last_line(kind: type[BaseException], error: BaseException, traceback: object) -> None:
    """Ctrl+C or SIGTERM before a tool's own handling starts (its imports, Hydra's composition): one
    line."""
    if isinstance(error, KeyboardInterrupt):
        print(f"{TOOL}: {STOPPED_BY_CTRL_C}", file=sys.stderr, flush=True)
        os._exit(130)
    if isinstance(error, Stopped):
        print(f"{TOOL}: error: {first_line(error)}", file=sys.stderr, flush=True)
        os._exit(Stopped.exit_code)
    sys.__excepthook__(kind, error, traceback)


STOPPED_BY_CTRL_C = "stopped by Ctrl+C; every file written is whole"
working = False  # the tool's own error handling runs (glo.app.cli.one_line_errors)
interrupted = False  # Ctrl+C was pressed: Lightning turns it into exit(1), glo's tools into 130
TOOL = _tool()
# a tool ends on a signal with one line and 130 / 143 at any moment, also while its imports load
if TOOL:
    signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    sys.excepthook = _last_line
