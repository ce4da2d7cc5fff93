"""Inpainting masks as Stable Diffusion's inpainting pipeline reads them: 1 = hole (to be filled), 0
= known.

A mask source maps (image id, original (height, width), size) to a binary (size, size) float32
array cropped like the image. `boxes` and `strokes` (free-form, in the style of LaMa's generator)
are drawn at `size` from a seed and the image id, so every image always gets the same mask;
`folder` reads `<path>/<id>.<png|jpg|...>`, which must have the image's original size and is
binarized at `threshold` (values are scaled to [0,1] first; anti-aliased or JPEG edges land on
one side or the other).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from glo import GloError, is_number
from glo.data.digests import sha256_file
from glo.data.images import repeated_stems
from glo.data.pixels import IMAGE_SUFFIXES, open_image, resize_center_crop

MAX_SHAPES = 1000


class MaskSource(Protocol):
    """(id, original (h, w), size) -> (size, size) hole mask; `known_only`: fit the masked image's
    latent on the known pixels only (the hole is the inpainter's to fill). `check(originals)`: every
    image's mask is vetted before any model loads. `digests`: each image's mask file SHA-256 after
    `check`, which every row records so that a resume recomputes the rows whose mask changed (None
    where the settings determine them)."""

    known_only: bool
    digests: dict[str, str] | None

    def check(self, originals: dict[str, tuple[int, int]]) -> None: ...

    def __call__(self, image_id: str, original: tuple[int, int], size: int) -> np.ndarray: ...


def no_mask() -> None:
    """`mask=none`: nothing to mask, only the full-image latent is optimized."""
    return None


def batch_holes(masks: MaskSource, meta: dict, size: int) -> Tensor:
    """(B,1,size,size) hole masks for a collated batch's meta (ids and original heights and
    widths)."""
    return torch.stack(
        [
            torch.from_numpy(masks(i, (int(h), int(w)), size))
            for i, h, w in zip(meta["id"], meta["height"], meta["width"])
        ]
    )[:, None]


class RandomMasks:
    """Seeded random holes covering a fraction in [coverage[0], coverage[1]] of the image."""

    KINDS = ("boxes", "strokes")

    def __init__(
        self, kind: str, coverage: tuple[float, float], seed: int, known_only: bool
    ) -> None:
        if kind not in self.KINDS:
            raise GloError(f"mask.kind={kind}: must be one of {', '.join(self.KINDS)}")
        pair = (
            list(coverage)
            if isinstance(coverage, Sequence) and not isinstance(coverage, str)
            else [coverage]
        )
        if not (len(pair) == 2 and all(is_number(c) for c in pair) and 0 < pair[0] <= pair[1] < 1):
            raise GloError(
                f"mask.coverage={pair}: need two numbers 0 < low <= high < 1, e.g. "
                "'mask.coverage=[0.1,0.3]'"
            )
        self.lo, self.hi = pair
        self.kind, self.seed, self.known_only = kind, seed, known_only
        # drawn from the settings, the seed and each id, which the fingerprint holds already
        self.digests = None

    def check(self, originals: dict[str, tuple[int, int]]) -> None:
        """Every id gets a mask: nothing to check."""

    def __call__(self, image_id: str, original: tuple[int, int], size: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, zlib.crc32(image_id.encode())))
        target = rng.uniform(self.lo, self.hi)
        mask = Image.new("L", (size, size), 0)
        covered = 0.0
        for _ in range(MAX_SHAPES):
            candidate = mask.copy()
            (self._box if self.kind == "boxes" else self._stroke)(
                ImageDraw.Draw(candidate), rng, size
            )
            c = np.asarray(candidate).mean() / 255
            # a shape that overshoots the range is dropped, a smaller one comes next
            if c <= self.hi:
                mask, covered = candidate, c
            if covered >= target:
                return (np.asarray(mask) > 127).astype(np.float32)
        raise GloError(
            f"mask.coverage=[{self.lo}, {self.hi}]: no {self.kind} mask in range for image "
            f"'{image_id}' after {MAX_SHAPES} shapes; widen the range"
        )

    @staticmethod
    def _box(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
        w, h = rng.integers(size // 16, size // 2 + 1, 2)
        x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=255)

    @staticmethod
    def _stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
        """A brush stroke: a random walk of thick segments with round joints, as LaMa draws them."""
        width = int(rng.integers(max(2, size // 32), max(3, size // 8) + 1))
        x, y = rng.integers(0, size, 2)
        for _ in range(rng.integers(1, 6)):
            angle, length = rng.uniform(0, 2 * math.pi), rng.integers(size // 16, size // 3 + 1)
            nx = int(np.clip(x + length * math.cos(angle), 0, size - 1))
            ny = int(np.clip(y + length * math.sin(angle), 0, size - 1))
            draw.line((x, y, nx, ny), fill=255, width=width)
            r = width // 2
            draw.ellipse((nx - r, ny - r, nx + r, ny + r), fill=255)
            x, y = nx, ny


class FolderMasks:
    """Mask images named like the image ids; white (above `threshold`) = hole."""

    def __init__(self, path: str, threshold: float, known_only: bool) -> None:
        root = Path(path)
        if not root.is_dir():
            raise GloError(f"mask.path={path}: no such directory")
        if not 0 < threshold < 1:
            raise GloError(f"mask.threshold={threshold}: must be in (0, 1)")
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        twice = repeated_stems(files)
        if twice:
            names = ", ".join(f.name for f in files if f.stem == twice[0])
            raise GloError(
                f"mask.path={path}: two masks for image '{twice[0]}' ({names}); keep one per image "
                "id"
            )
        self.files = {f.stem: f for f in files}
        self.path, self.threshold, self.known_only = root, threshold, known_only
        self.digests: dict[str, str] | None = None

    def check(self, originals: dict[str, tuple[int, int]]) -> None:
        """Fail before any model loads if an image has no mask or one that cannot be read or has
        another size."""
        missing = [i for i in originals if i not in self.files]
        if missing:
            raise GloError(
                f"mask.path={self.path}: no mask for image id(s) {', '.join(missing[:5])}"
                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            )
        for image_id, original in originals.items():
            self._read(image_id, original)
        self.digests = {i: sha256_file(self.files[i]) for i in originals}

    def _read(self, image_id: str, original: tuple[int, int]) -> Image.Image:
        if image_id not in self.files:
            raise GloError(f"mask.path={self.path}: no mask for image id(s) {image_id}")
        path = self.files[image_id]
        mask = open_image(path)[0].convert("L")  # any mode; 16-bit scaled to 8-bit
        height, width = original
        if mask.size != (width, height):
            raise GloError(
                f"{path}: mask is {mask.width}x{mask.height}, image '{image_id}' is "
                f"{width}x{height}"
            )
        return mask

    def __call__(self, image_id: str, original: tuple[int, int], size: int) -> np.ndarray:
        binary = self._read(image_id, original).point(
            lambda v: 255 if v / 255 > self.threshold else 0
        )
        return (
            np.asarray(resize_center_crop(binary, size, Image.Resampling.NEAREST)) > 127
        ).astype(np.float32)
