"""Images in, (H,W,3) float32 arrays in [-1,1] out, all through one loading path with one-line errors.

Every dataset yields `(image, meta)` with meta = {id, source, height, width} (the original size).
Images are resized so the shorter side is `size`, then centre-cropped to size x size, so a batch
stacks and its latents are (4, size/8, size/8).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from glo import GloError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def check_size(size: int) -> int:
    if not isinstance(size, int) or size < 8 or size % 8:
        raise GloError(f"data.size={size}: must be a positive multiple of 8 (the VAE downsamples by 8)")
    return size


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL reads: 16-bit and float greys are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") and a.max() > 255 else max(a.max(), 1.0)
        img = Image.fromarray(np.clip(a / top * 255.0, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.LANCZOS) if (w, h) != img.size else img
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 127.5 - 1.0


def open_image(path: Path, header_only: bool = False) -> Image.Image | None:
    """Decode fully now (or just the header, to vet a folder fast), so a bad file fails here with its name."""
    try:
        with Image.open(path) as img:
            if header_only:
                return None
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise GloError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class ImageDataset(Dataset):
    """Shared behaviour: subclasses list `ids` and load the i-th image with its meta."""

    ids: list[str]

    def __init__(self, size: int, limit: int | None) -> None:
        self.size = check_size(size)
        self.limit = limit

    def _truncate(self, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise GloError(f"image ids must be unique; these file names repeat: {', '.join(dup)}")
        return ids[: self.limit] if self.limit else ids

    def load(self, i: int) -> tuple[Image.Image, dict]:
        raise NotImplementedError

    def image(self, i: int) -> tuple[Image.Image, dict]:
        img, meta = self.load(i)
        return resize_center_crop(img, self.size), meta

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[np.ndarray, dict]:
        img, meta = self.image(i)
        return to_array(img), meta


class SampleDataset(ImageDataset):
    """Colour photos that ship inside scikit-image: the offline default, no files needed."""

    def __init__(self, size: int, limit: int | None = None) -> None:
        super().__init__(size, limit)
        self.ids = self._truncate(list(SAMPLE_PHOTOS))

    def load(self, i: int) -> tuple[Image.Image, dict]:
        import skimage.data

        img = Image.fromarray(getattr(skimage.data, self.ids[i])()).convert("RGB")
        return img, {"id": self.ids[i], "source": f"skimage.data.{self.ids[i]}", "height": img.height, "width": img.width}


class FolderDataset(ImageDataset):
    """Every image file directly inside `path` (jpg, png, tif, webp, bmp), sorted by name; id = file stem."""

    def __init__(self, path: str, size: int, limit: int | None = None) -> None:
        super().__init__(size, limit)
        root = Path(path)
        if not root.is_dir():
            raise GloError(f"data.path={path}: no such directory")
        self.files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise GloError(f"data.path={path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        self.ids = self._truncate([f.stem for f in self.files])
        self.files = self.files[: len(self.ids)]
        for f in self.files:  # a non-image file stops the run before any model is loaded
            open_image(f, header_only=True)

    def load(self, i: int) -> tuple[Image.Image, dict]:
        img = open_image(self.files[i])
        return img, {"id": self.ids[i], "source": str(self.files[i]), "height": img.height, "width": img.width}


class BSDS500Dataset(ImageDataset):
    """A split written by `python -m glo.prepare`: `<processed_data_dir>/<split>/images/<id>.npz`."""

    def __init__(self, processed_data_dir: str, split: str, cache_in_memory: bool = False, size: int = 256,
                 limit: int | None = None) -> None:
        super().__init__(size, limit)
        folder = Path(processed_data_dir) / split / "images"
        self.files = sorted(folder.glob("*.npz"))
        if not self.files:
            raise GloError(f"{folder}: no processed images; run: python -m glo.prepare --split {split}")
        self.ids = self._truncate([f.stem for f in self.files])
        self.cache: dict[int, tuple[Image.Image, dict]] | None = {} if cache_in_memory else None

    def load(self, i: int) -> tuple[Image.Image, dict]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        try:
            with np.load(self.files[i]) as f:
                array, meta = f["image"], json.loads(str(f["meta"]))
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"image is {array.dtype} {array.shape}, expected uint8 (H,W,3)")
            img = Image.fromarray(array)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GloError(f"{self.files[i]}: not a glo.prepare image file ({e})") from None
        if self.cache is not None:
            self.cache[i] = (img, meta)
        return img, meta
