"""What a file holds, as a SHA-256: rows record their sources' so a resume can tell what changed."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The file's bytes' SHA-256: each exported row records its source's, so a resumed run can tell
    which images changed since their rows were made."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_files(files: dict[str, Path]) -> str:
    """One SHA-256 over named files, from each one's name and SHA-256 in the given order: what a run
    directory's fingerprint holds for a VAE's weights or a folder of masks."""
    h = hashlib.sha256()
    for name, path in files.items():
        h.update(f"{name} {sha256_file(path)}\n".encode())
    return h.hexdigest()


def text_digest(texts: object) -> str:
    """One SHA-256 over a text column (bytes or str, in order): HDF5 checks no string chunk, readers
    check this."""
    h = hashlib.sha256()
    for t in texts:
        b = t if isinstance(t, bytes) else str(t).encode("utf-8", "surrogateescape")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()
