"""One loading path for every picture glo reads: decoded, turned upright, in RGB at 8 bits, resized
and cropped, as a tensor in [-1,1]; a file that is not a picture is one line naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from glo import GloError

log = logging.getLogger("glo")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")


ORIENTATION = 0x0112  # the EXIF tag


def check_size(size: int, name: str = "data.size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 8:
        raise GloError(
            f"{name}={size}: must be a multiple of 8 (the VAE downsamples by 8), at least 16 "
            "(SSIM's window is 11 px)"
        )
    return size


# Full scale of PIL's modes beyond 8 bits, from the mode alone (never from an image's own values,
# which would stretch a dark image to white): "I" is how PIL reads 16-bit PNG and PGM, float images
# are in [0, 1].
FULL_SCALE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I": 65535.0, "F": 1.0}


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL reads: 16-bit and float greys are scaled by their mode's full
    scale."""
    if img.mode in FULL_SCALE:
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(
            np.clip(a / FULL_SCALE[img.mode] * 255.0, 0, 255).round().astype(np.uint8)
        )
    return img.convert("RGB")


def resize_center_crop(
    img: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.LANCZOS
) -> Image.Image:
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), resample) if (w, h) != img.size else img
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image) -> Tensor:
    """(3,H,W) float32 in [-1,1]: what the VAE takes."""
    return (
        torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        .permute(2, 0, 1)
        .contiguous()
    )


def open_image(path: Path, size: int | None = None) -> tuple[Image.Image, tuple[int, int], int]:
    """Decode fully now, so a truncated or non-image file fails here with its name.

    With `size`, JPEGs decode at the smallest built-in scale that still covers it: a huge photo is
    never held at full resolution just to be shrunk. Phone photos store pixels sideways with an EXIF
    orientation: the image is turned upright. Returns it, its original (width, height) upright, and
    the EXIF orientation it had (1 = none).
    """
    try:
        with Image.open(path) as img:
            original = img.size
            if min(original) < 8:
                raise ValueError(f"image is {img.width}x{img.height}, smaller than 8 px")
            if size and img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
            orientation = int(img.getexif().get(ORIENTATION, 1))
            upright = ImageOps.exif_transpose(img)
            return (
                to_rgb(upright),
                original if upright.size == img.size else original[::-1],
                orientation,
            )
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GloError(f"{path}: not a readable image ({why})") from None


def to_8bit(x: Tensor) -> Tensor:
    """What saving as an 8-bit image keeps: clamped to [-1,1] and rounded to 256 levels."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
