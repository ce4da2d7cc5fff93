"""What every `python -m glo.<tool>` shares: one-line errors and a checked output directory."""

from __future__ import annotations

import difflib
import errno
import os
import re
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    ConfigCompositionException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    OmegaConfBaseException,
)

import glo
from glo import GloError, Stopped, first_line

if TYPE_CHECKING:
    from glo.app.export import LatentExporter

CONF = Path(__file__).resolve().parents[2] / "conf"  # every tool's config_path
USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# not a bug's
COMMAND_LINE_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)


@contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    """Print a GloError (also when Hydra's instantiate wrapped it) as one line and exit 1.

    A full disk, a read-only or immutable directory is the user's to fix, not a bug: one line too
    (every file is written atomically, so nothing half-written is left), and so is running out of
    memory. Anything else is a bug and keeps its traceback.
    """
    threading.excepthook = _main_thread_reports
    glo.working = True
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: {glo.STOPPED_BY_CTRL_C}", file=sys.stderr)
        sys.exit(130)
    except SystemExit as e:
        # Lightning's exit(1) after Ctrl+C, once glo's exporter said what is safe
        if glo.interrupted and e.code == 1:
            sys.exit(130)
        raise
    except OSError as e:
        if e.errno not in USER_FIXABLE:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(
            f"{prog}: error: cannot write{where}: {e.strerror}; nothing half-written is left, "
            "finished work is kept: fix that and run the same command again",
            file=sys.stderr,
        )
        sys.exit(1)
    except Exception as e:
        # first: a SIGTERM inside a resolver or instantiate is a stop, not their error
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, GloError):
            # OmegaConf replaces an error raised in a resolver by its own, keeping it only as the
            # context
            cause = cause.__cause__ or (
                cause.__context__ if isinstance(cause, OmegaConfBaseException) else None
            )
        # inside the job: Hydra prints its own line for an error escaping it
        line = None if cause else unresolved(e)
        if line:
            print(f"{prog}: error: {line}", file=sys.stderr)
            sys.exit(1)
        if cause is None:  # torch is imported only here: glo.compare never needs it otherwise
            from glo.model.memory import out_of_memory

            if not out_of_memory(e):
                raise
            print(
                f"{prog}: error: out of memory ({str(e).splitlines()[0]}); run it again with a "
                "smaller batch size or image size",
                file=sys.stderr,
            )  # glo.run names its own switches (a GloError)
            sys.exit(1)
        if _sweep_goes_on(prog, cause):
            return
        print(f"{prog}: error: {first_line(cause)}", file=sys.stderr)
        sys.exit(getattr(cause, "exit_code", 1))
    finally:
        glo.working = False


FAILED_JOBS: list[str] = []  # this multirun's jobs that stopped on a GloError


def _sweep_goes_on(prog: str, error: GloError) -> bool:
    """In a --multirun, a job's bad setting (lr=inf) ends that job, not the sweep: its line is
    printed and kept in the job's error.txt (glo.compare lists it), and the sweep exits 1 at its
    end. A stop (SIGTERM) ends the sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if (
        isinstance(error, Stopped)
        or not HydraConfig.initialized()
        or HydraConfig.get().mode != RunMode.MULTIRUN
    ):
        return False
    job = HydraConfig.get().job.num
    print(f"{prog}: error: job {job}: {first_line(error)}", file=sys.stderr, flush=True)
    from glo.store.atomic import save_text

    save_text(Path(HydraConfig.get().runtime.output_dir) / "error.txt", f"{first_line(error)}\n")
    FAILED_JOBS.append(str(job))
    return True


def hydra_main(main: Callable[[], Any]) -> None:
    """Call a @hydra.main function, with Hydra's errors about the command line (a mistyped key, an
    option that does not exist, a malformed value) as one line, like every other bad input. Hydra's
    own span several lines and, for a key, suggest adding it with `+`, which would change nothing.
    Anything else keeps its traceback."""
    # Hydra raises its errors instead of printing them
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    line = null_group(sys.argv[1:])
    if not line:
        try:
            main()
            if not FAILED_JOBS:
                return
            jobs = ", ".join(FAILED_JOBS)
            line = f"job(s) {jobs} of the sweep failed (each job's error.txt says why)"
        except COMMAND_LINE_ERRORS as e:
            line = one_line(e)
    print(f"glo: error: {line}", file=sys.stderr)
    sys.exit(1)


def unresolved(e: Exception) -> str | None:
    """A value the job could not read because of the command line: `~lr` deleted a key the run
    reads, or `${oc.env:UNSET}` names no variable. The line, or None (then it is glo's own bug)."""
    if not isinstance(
        e,
        (
            InterpolationResolutionError,
            ConfigAttributeError,
            ConfigKeyError,
            InstantiationException,
        ),
    ):
        return None
    deleted = [
        a
        for a in sys.argv[1:]
        if a.startswith("~")
        and re.search(rf"\b{re.escape(a[1:].split('=')[0].rpartition('.')[2])}\b", _joined(e))
    ]
    if deleted:
        return (
            f"{' '.join(deleted)}: the run needs what was deleted ({_joined(e)}); set a value "
            "instead of deleting it"
        )
    if isinstance(e, InterpolationResolutionError) and e.full_key:
        first = str(e).splitlines()[0]
        return f"{e.full_key}: cannot resolve its value ({first}); set it or give the value"
    return None


def one_line(e: Exception) -> str:
    """A Hydra error about the command line, as one line naming the override."""
    cause = e.__cause__
    # max_step=50: no such key
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        if f"~{cause.full_key}" in sys.argv[1:]:  # ~data data.limit=1
            under = next(
                (a for a in sys.argv[1:] if a.startswith(f"{cause.full_key}.")),
                "a setting under it",
            )
            return (
                f"~{cause.full_key} {under}: {cause.full_key} was deleted, so nothing under it can "
                f"be set; drop ~{cause.full_key} or {under}"
            )
        line = next((a for a in sys.argv[1:] if a.startswith(f"{cause.full_key}=")), cause.full_key)
        return no_such_setting(line, cause.full_key, cause.parent_node or {})
    # loss=l3: no such file in conf/loss
    if isinstance(e, MissingConfigException) and e.options is not None:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        return f"{group}={name}: there is no {group} {name}; choose one of {', '.join(e.options)}"
    text = _joined(e)
    return (
        f"{e.override}: cannot read it: {text}" if isinstance(e, OverrideParseException) else text
    )


def _joined(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def null_group(args: list[str]) -> str | None:
    """`logger=null`: Hydra cannot set a config group to null, and says so in a ValueError's
    traceback. The line instead, with the group's options (a group that can be off has a `none`
    option)."""
    for arg in args:
        group, _, value = arg.partition("=")
        if value == "null" and (CONF / group).is_dir():
            options = ", ".join(sorted(f.stem for f in (CONF / group).glob("*.yaml")))
            return (
                f"{arg}: a config group cannot be null; choose one of {options}, or leave {group} "
                "out for its default"
            )
    return None


def no_such_setting(line: str, key: str, known: Iterable[str], why: str = "") -> str:
    """`line` (key=value) sets `key`, which glo does not have: the message, with the nearest keys of
    `known` (the node beside it) as a hint."""
    parent, _, name = key.rpartition(".")
    near = nearest(name, known)
    prefix, value = f"{parent}." if parent else "", line.split("=", 1)[1] if "=" in line else ""
    said = [f"{prefix}{k}={value}" for k in near]
    options = f"{', '.join(said[:-1])} or {said[-1]}" if len(said) > 1 else "".join(said)
    hint = f" (did you mean {options}?)" if said and value else ""
    return (
        f"{line}: glo has no setting {key}{why}{hint}; the settings are the keys in conf/ and the "
        "README"
    )


def nearest(name: str, node: Iterable[str]) -> list[str]:
    """The keys one level down in `node` named `name` (size=512 means data.size, devices=2
    trainer.devices), else the key named most like it (max_step: max_steps), one beside first. Keys
    that only repeat another (an interpolation) are not offered, nor `_target_` and its kind."""
    # `name` itself is there when added with +
    beside = [k for k in node if k not in (name, "hydra")]
    keys = [(k, k) for k in beside]  # (name, full key)
    if isinstance(node, DictConfig):
        for k in beside:
            child = None if OmegaConf.is_interpolation(node, k) else node[k]
            if isinstance(child, DictConfig):
                keys += [
                    (leaf, f"{k}.{leaf}")
                    for leaf in child
                    if not leaf.startswith("_") and not OmegaConf.is_interpolation(child, leaf)
                ]
    same = sorted(full for leaf, full in keys if leaf == name)
    if same:
        return same
    close = difflib.get_close_matches(name, [leaf for leaf, _ in keys], n=1)
    return [next(full for leaf, full in keys if leaf == close[0])] if close else []


def _main_thread_reports(args: threading.ExceptHookArgs) -> None:
    """A writer thread (TensorBoard's) that hits a full disk stays quiet: the main thread meets the
    same error at its next write and reports it in one line."""
    if not (isinstance(args.exc_value, OSError) and args.exc_value.errno in USER_FIXABLE):
        threading.__excepthook__(args)


class WritableOutputDir(Callback):
    """A Hydra callback: an output directory that cannot be created or written is one line, before
    Hydra's own mkdir would end the run with a traceback. Hooks into `hydra.callbacks` of every
    entry point's config."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            path = OmegaConf.select(config, key, throw_on_resolution_failure=True)
        except InterpolationResolutionError as e:  # ${oc.env:UNSET}
            print(
                f"glo: error: {key}: cannot resolve its value ({str(e).splitlines()[0]}); set it "
                "or give the value",
                file=sys.stderr,
            )
            sys.exit(1)
        # an unset variable in a script: the results would land in the working directory
        if not str(path).strip():
            print(
                f"glo: error: {key} is empty; name the directory for the results", file=sys.stderr
            )
            sys.exit(1)
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            print(
                f"glo: error: output directory {path}: cannot write there ({e.strerror or e})",
                file=sys.stderr,
            )
            sys.exit(1)


class NoUnreadKeys(Callback):
    """A Hydra callback: `+max_step=50`, which Hydra's own error suggests for a mistyped key, adds a
    top-level key that no glo tool reads, so the run would go ahead on the defaults. One line
    instead, naming the nearest key. A key added inside a `_target_` node reaches its constructor,
    which refuses names it does not take."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    @staticmethod
    def _check(config: DictConfig) -> None:
        # as typed: ${oc.env:X} too
        typed = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        for override in OverridesParser.create().parse_overrides(typed):
            key = override.key_or_group
            if override.is_add() and "." not in key:
                line = no_such_setting(
                    override.input_line, key, config, ", so it would change nothing"
                )
                print(f"glo: error: {line}", file=sys.stderr)
                sys.exit(1)


class StopOnSigterm:
    """SIGTERM ends glo.run in one line, exit 143, wherever it lands. While batches run,
    LatentExporter's handler replaces this one and the run stops after the batch in flight. Anywhere
    else (checks, loading the VAE, the report) it stops at once: everything glo writes is written
    whole or not at all."""

    def __init__(self) -> None:
        self.exporter: LatentExporter | None = None  # set once known: what is safe, and where

    def __enter__(self) -> StopOnSigterm:
        self.previous = signal.signal(signal.SIGTERM, self)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        how = (
            self.exporter.stopped("by SIGTERM")
            if self.exporter
            else "stopped by SIGTERM before any work"
        )
        glo.stop_here(Stopped(how), frame)


def command_line(tool: str) -> str:
    """The command that reproduces this Hydra job's figures: the tool and its overrides, less where
    they go."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [
        o for o in HydraConfig.get().overrides.task if not o.startswith(("publish=", "hydra."))
    ]
    return " ".join([f"python -m {tool}", *overrides])
