"""What every `python -m glo.<tool>` shares: one-line errors and a checked output directory."""
from __future__ import annotations

import difflib
import errno
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from glo import GloError

USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Print a GloError (also when Hydra's instantiate wrapped it) as one line and exit 1.

    A full disk, a read-only or immutable directory is the user's to fix, not a bug: one line too (every
    file is written atomically, so nothing half-written is left). Anything else is a bug and keeps its traceback.
    """
    threading.excepthook = _main_thread_reports
    try:
        yield
    except OSError as e:
        if e.errno not in USER_FIXABLE:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"{prog}: error: cannot write{where}: {e.strerror}; nothing half-written is left, "
              "finished work is kept: fix that and run the same command again", file=sys.stderr)
        sys.exit(1)
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, GloError):
            cause = cause.__cause__
        if cause is None:
            raise
        print(f"{prog}: error: {cause}", file=sys.stderr)
        sys.exit(getattr(cause, "exit_code", 1))


def _main_thread_reports(args: threading.ExceptHookArgs) -> None:
    """A writer thread (TensorBoard's) that hits a full disk stays quiet: the main thread meets the same error
    at its next write and reports it in one line."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in USER_FIXABLE):
        threading.__excepthook__(args)


class WritableOutputDir(Callback):
    """A Hydra callback: an output directory that cannot be created or written is one line, before Hydra's
    own mkdir would end the run with a traceback. Hooks into `hydra.callbacks` of every entry point's config."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            print(f"glo: error: output directory {path}: cannot write there ({e.strerror or e})",
                  file=sys.stderr)
            sys.exit(1)


class NoUnreadKeys(Callback):
    """A Hydra callback: `+max_step=50`, which Hydra's own error suggests for a mistyped key, adds a top-level key
    that no glo tool reads, so the run would go ahead on the defaults. One line instead, naming the nearest key.
    A key added inside a `_target_` node reaches its constructor, which refuses names it does not take."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        for override in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
            key = override.key_or_group
            if override.is_add() and "." not in key:
                near = difflib.get_close_matches(key, [k for k in config if k not in (key, "hydra")], n=1)
                value = override.input_line.split("=", 1)[1]
                hint = f" (did you mean {near[0]}={value}?)" if near else ""
                print(f"glo: error: {override.input_line}: glo has no setting {key}, so it would change nothing"
                      f"{hint}; the settings are the keys in conf/ and the README", file=sys.stderr)
                sys.exit(1)
