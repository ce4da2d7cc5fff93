"""Images in, (3,H,W) float32 tensors in [-1,1] out, all through one loading path with one-line
errors.

Every dataset yields `(image, meta)` with meta = {id, source, height, width} (the original size).
Images are resized so the shorter side is `size`, then centre-cropped to size x size, so a batch
stacks and its latents are (4, size/8, size/8).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from glo import GloError
from glo.data.digests import sha256_file
from glo.data.pixels import IMAGE_SUFFIXES, check_size, open_image, resize_center_crop, to_tensor

log = logging.getLogger("glo")
SAMPLE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
)


class ImageDataset(Dataset):
    """Shared behaviour: subclasses list `ids` and load the i-th image with its meta."""

    ids: list[str]

    def __init__(self, size: int, limit: int | None) -> None:
        self.size = check_size(size)
        self.limit = limit
        self._metas: dict[str, dict] | None = None  # each image's meta, once read

    def load(self, i: int) -> tuple[Image.Image, dict]:
        raise NotImplementedError

    def metas(self) -> dict[str, dict]:
        """Each image's meta, by id, read once: the masks' check and the resume's both ask for
        it."""
        if self._metas is None:
            self._metas = {self.ids[i]: self.load(i)[1] for i in range(len(self))}
        return self._metas

    def digests(self) -> dict[str, str]:
        """Each image's source SHA-256 (meta `sha256`), by id: what a resumed run checks finished
        rows against."""
        return {i: m["sha256"] for i, m in self.metas().items()}

    def originals(self) -> dict[str, tuple[int, int]]:
        """Each image's original (height, width), by id: what its mask must match."""
        return {i: (m["height"], m["width"]) for i, m in self.metas().items()}

    def image(self, i: int) -> tuple[Image.Image, dict]:
        img, meta = self.load(i)
        return resize_center_crop(img, self.size), meta

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, dict]:
        img, meta = self.image(i)
        return to_tensor(img), {**meta, "index": i}  # the position names the export shard


class SampleDataset(ImageDataset):
    """Colour photos that ship inside scikit-image: the offline default, no files needed."""

    def __init__(self, size: int, limit: int | None = None) -> None:
        super().__init__(size, limit)
        self.ids = list(SAMPLE_PHOTOS)[:limit]

    def load(self, i: int) -> tuple[Image.Image, dict]:
        import skimage.data

        array = np.ascontiguousarray(getattr(skimage.data, self.ids[i])())
        img = Image.fromarray(array).convert("RGB")
        return img, {
            "id": self.ids[i],
            "source": f"skimage.data.{self.ids[i]}",
            "height": img.height,
            "width": img.width,
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        }


class FileDataset(ImageDataset):
    """Images from files, each vetted (fully decoded) up front: a bad file stops the run before any
    model is loaded (`on_error=fail`), or is left out with one logged line and listed in `skipped`
    (`on_error=skip`)."""

    def __init__(
        self,
        files: list[Path],
        size: int,
        limit: int | None,
        on_error: str,
        on_error_key: str | None = "data.on_error",
    ) -> None:
        super().__init__(size, limit)
        if on_error not in ("fail", "skip"):
            raise GloError(f"data.on_error={on_error}: must be fail or skip")
        self.skipped: list[dict[str, str]] = []
        # turned upright by their EXIF orientation (recorded in metadata.json)
        self.turned: list[str] = []
        self.files = []
        self._metas = {}  # filled while vetting: no file is read a second time for its meta
        dup = repeated_stems(files)
        if dup:
            raise GloError(f"image ids must be unique; these file names repeat: {', '.join(dup)}")
        for f in files:
            # the first `limit` good ones: a skipped file does not count
            if len(self.files) == self.limit:
                break
            try:
                meta = self.read(f)[1]
                if meta.get("exif_orientation", 1) != 1:
                    self.turned.append(str(f))
                self._metas[f.stem] = meta
                self.files.append(f)
            except GloError as e:
                if on_error == "fail":
                    skip = (
                        f", or run with {on_error_key}=skip to leave such files out"
                        if on_error_key
                        else ""
                    )
                    raise GloError(f"{e}; replace or remove it{skip}") from None
                log.warning("skipping %s", e)
                self.skipped.append({"source": str(f), "reason": str(e)})
        if files and not self.files:
            raise GloError(
                f"all {len(files)} image files were skipped (the first: "
                f"{self.skipped[0]['reason']}); replace or remove them"
            )
        self.ids = [f.stem for f in self.files]

    def read(self, path: Path) -> tuple[Image.Image, dict]:
        raise NotImplementedError

    def load(self, i: int) -> tuple[Image.Image, dict]:
        return self.read(self.files[i])


def repeated_stems(files: list[Path]) -> list[str]:
    """The file names, less their suffix, that more than one of `files` has (a.png and a.jpg): one
    id, two files."""
    stems = [f.stem for f in files]
    return sorted({i for i in stems if stems.count(i) > 1})


def image_files(root: Path) -> list[Path]:
    """The image files directly inside root, sorted. A dangling link is kept, so that it fails (or
    is skipped and listed) like any unreadable file."""
    return sorted(
        f
        for f in root.iterdir()
        if (f.is_file() or f.is_symlink()) and f.suffix.lower() in IMAGE_SUFFIXES
    )


def subfolders(root: Path) -> str:
    """The first few folders inside root, for an error: images are not searched recursively, so a
    folder without images of its own is often a dataset root whose splits the user meant."""
    return ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())[:5])


class FolderDataset(FileDataset):
    """Every image file directly inside `path` (jpg, png, tif, webp, bmp), sorted by name; id = file
    stem. `key` is the config key that set `path`, for the errors (glo.train_vae reads two
    folders)."""

    def __init__(
        self,
        path: str,
        size: int,
        limit: int | None = None,
        on_error: str = "fail",
        key: str = "data.path",
    ) -> None:
        check_size(size)  # a config mistake is reported before the disk is touched
        root = Path(path)
        if not root.is_dir():
            raise GloError(f"{key}={path}: no such directory")
        files = image_files(root)
        if not files:
            names = subfolders(root)
            hint = f"; it has subfolders ({names}): point {key} at one" if names else ""
            raise GloError(f"{key}={path}: no image files ({', '.join(IMAGE_SUFFIXES)}){hint}")
        # glo.run's
        super().__init__(
            files, size, limit, on_error, "data.on_error" if key == "data.path" else None
        )

    def read(self, path: Path) -> tuple[Image.Image, dict]:
        img, (width, height), orientation = open_image(path, self.size)
        return img, {
            "id": path.stem,
            "source": str(path),
            "height": height,
            "width": width,
            "exif_orientation": orientation,
            "sha256": sha256_file(path),
        }


class BSDS500Dataset(FileDataset):
    """A split written by `python -m glo.prepare`:
    `<processed_data_dir>/<split>/images/<id>.npz`."""

    def __init__(
        self,
        processed_data_dir: str,
        split: str,
        cache_in_memory: bool = False,
        size: int = 256,
        limit: int | None = None,
        on_error: str = "fail",
    ) -> None:
        check_size(size)
        folder = Path(processed_data_dir) / split / "images"
        files = sorted(folder.glob("*.npz"))
        if not files:
            raise GloError(
                f"{folder}: no processed images; run: python -m glo.prepare --split {split}"
            )
        stats_file = folder.parent / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
        # upscaling the shrunk copy would not give what the originals give
        if stats.get("size", size) < size:
            out = f"{str(processed_data_dir).rstrip('/')}_{size}"
            raise GloError(
                f"{folder.parent}: prepared at {stats['size']} px, smaller than data.size={size}; "
                "prepare it at that size: python -m glo.prepare --src "
                f"{stats.get('source', 'DIR')} --split {split} --size {size} --out {out}, then add "
                f"data.processed_data_dir={out} (or run with data.size={stats['size']})"
            )
        self.cache: dict[Path, tuple[Image.Image, dict]] | None = {} if cache_in_memory else None
        super().__init__(files, size, limit, on_error)

    def read(self, path: Path) -> tuple[Image.Image, dict]:
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        try:
            with np.load(path) as f:
                array, meta = f["image"], json.loads(str(f["meta"]))
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"image is {array.dtype} {array.shape}, expected uint8 (H,W,3)")
            img = Image.fromarray(array)
            meta["sha256"] = sha256_file(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GloError(f"{path}: not a glo.prepare image file ({e})") from None
        if self.cache is not None:
            self.cache[path] = (img, meta)
        return img, meta
