"""Files that are either complete or absent: written under a temporary name, flushed, then
renamed."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`, synced to disk and renamed to it only if the block finishes
    (the block closes its file): no half-written files, not even after a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        # a failed write names no file: name the one it was for
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def to_json(obj: Any) -> str:
    """glo's JSON: indented, and anything JSON lacks (paths, dates) as its string."""
    return json.dumps(obj, indent=2, default=str)


def printable(text: str) -> str:
    """A file name that is not UTF-8 (Python holds its bytes as surrogates) with those bytes as
    backslash escapes: text every writer, font and terminal takes, instead of a failure after all
    the work."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(printable(text).encode()))


def save_json(path: Path, obj: Any) -> None:
    save_text(path, to_json(obj))
