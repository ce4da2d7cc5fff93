"""The latents file format, for readers: latents.npz / latents.h5 and LatentDataset for downstream
training.

Plain PyTorch and NumPy: a training script that reads glo's latents imports neither Lightning nor
Hydra.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from glo import GloError
from glo.data.digests import text_digest
from glo.layout import INPAINTING, LATENTS, MANIFESTS, REQUIRED, SHARDS, manifests


def _npz_member(path: Path, z: zipfile.ZipFile, key: str) -> np.ndarray:
    """A numeric member of an uncompressed .npz (what np.savez writes), memory-mapped rather than
    read."""
    info = z.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size == 0:
        return np.load(z.open(info))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        if dtype.hasobject or dtype.kind == "U":
            f.seek(info.header_offset + 30 + name_len + extra_len)
            return np.lib.format.read_array(f)
        return np.memmap(
            path, dtype=dtype, mode="r", shape=shape, offset=f.tell(), order="F" if fortran else "C"
        )


# NPZ files whose CRCs this process (or its parent) has verified
_checked: set[tuple[str, int, int]] = set()


def failed_crc(path: Path, z: zipfile.ZipFile) -> str | None:
    """The first member of the NPZ `z` (opened from `path`) whose zip CRC fails, or None. Checked
    once per file version and process tree (a resume's shard check and its merge read each shard
    once): memory-mapped members skip the check zipfile makes on reads, so a flipped byte would
    reach the caller as a changed latent."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _checked:
        return None
    bad = z.testzip()
    if not bad:
        _checked.add(key)
    return bad


def open_latents(path: str | Path) -> dict[str, Any]:
    """Every array of a latents.npz / latents.h5 (or a shard), read lazily: NPZ members are
    memory-mapped once their CRCs are verified, HDF5 datasets are read chunk by chunk as they are
    indexed (each chunk checks its own Fletcher-32 sum). One-line error for a missing or damaged
    file, and for a run's dataset whose images are not those its shards list (a run stopped between
    computing and merging)."""
    path = Path(path)
    try:
        if path.suffix == ".h5":
            f = h5py.File(path, "r")
            groups = [k for k in f if not isinstance(f[k], h5py.Dataset)]
            if groups:
                raise GloError(
                    f"{path}: '{groups[0]}' is an HDF5 group; a latents file holds only arrays"
                )
            arrays = {k: f[k] for k in f}
            for k, d in arrays.items():
                if (
                    d.dtype == object
                    and "sha256" in d.attrs
                    and text_digest(d[()]) != d.attrs["sha256"]
                ):
                    raise GloError(
                        f"{path}: its '{k}' differ from what was written (their digest does not "
                        "match); compute it again (glo.run in its directory recomputes what is "
                        "damaged)"
                    )
        else:
            with zipfile.ZipFile(path) as z:
                bad = failed_crc(path, z)
                if bad:
                    raise GloError(
                        f"{path}: damaged ({bad} fails its checksum); compute it again (glo.run in "
                        "its directory recomputes what is damaged)"
                    )
                arrays = {
                    n[:-4]: _npz_member(path, z, n[:-4]) for n in z.namelist() if n.endswith(".npy")
                }
        arrays = require(path, arrays, REQUIRED)
    except FileNotFoundError:
        raise GloError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
        raise GloError(f"{path}: not a readable latents file ({e})") from None
    _check_manifests(path, arrays["ids"])
    return arrays


def _check_manifests(path: Path, ids: Any) -> None:
    """A run's latents.npz / latents.h5 must hold exactly the images its shards' manifests list."""
    if path.name not in LATENTS.values() or not any((path.parent / SHARDS).glob(MANIFESTS)):
        return
    try:
        listed = {i for part in manifests(path.parent / SHARDS).values() for i in part}
    except (OSError, GloError):
        return  # the run itself reports a damaged manifest; the file may still be whole
    if listed != {str(i) for i in _in_memory(ids)}:
        raise GloError(
            f"{path}: holds other images than {path.parent / SHARDS} lists, so its run stopped "
            "before merging them; run the same command again to finish it"
        )


def require(path: Path, arrays: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """One line naming the first required array that is missing or has another number of rows than
    `ids`."""
    for k in keys:
        if k not in arrays:
            raise GloError(
                f"{path}: no '{k}' array (a glo latents file has {', '.join(keys)}; it has "
                f"{', '.join(sorted(arrays)) or 'none'})"
            )
        if len(arrays[k]) != len(arrays[keys[0]]):
            raise GloError(
                f"{path}: '{k}' has {len(arrays[k])} rows, '{keys[0]}' has {len(arrays[keys[0]])}"
            )
    return arrays


def find_latents(run_dir: str | Path) -> Path:
    """The latents file of a run directory, whichever format it was exported in."""
    run = Path(run_dir)
    for name in LATENTS.values():
        if (run / name).is_file():
            return run / name
    raise GloError(f"{run / LATENTS['npz']}: no such file (nor {LATENTS['hdf5']})")


def _in_memory(v: Any) -> np.ndarray:
    """A writable copy of a lazy array; HDF5 strings (objects) become str."""
    a = np.array(v[()])
    if a.dtype != object:
        return a
    return np.array(
        [t.decode("utf-8", "surrogateescape") if isinstance(t, bytes) else str(t) for t in a.flat],
        dtype=str,
    ).reshape(a.shape)


def damaged(path: Path, e: OSError) -> GloError:
    """An HDF5 chunk that fails its checksum (or cannot be read) as one line naming the file."""
    return GloError(
        f"{path}: damaged ({e}); compute it again (glo.run in its directory recomputes what is "
        "damaged)"
    )


def load_latents(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a latents file, in memory."""
    arrays = open_latents(path)
    try:
        return {k: _in_memory(v) for k, v in arrays.items()}
    except OSError as e:
        raise damaged(Path(path), e) from None


class LatentDataset(Dataset):
    """Optimized latents for downstream training: item = {id, latent, initial_latent} as float32
    tensors.

    inpainting=True adds what Stable Diffusion's inpainting UNet is conditioned on: `mask` (1,h,w),
    1 = hole, and `masked_latent` (4,h,w), the optimized latent of the masked image
    (`initial_masked_latent`: the encoder's, to train as SD's UNet was). diffusers' pipeline builds
    its 9-channel input as torch.cat([noisy_latent, mask, masked_latent], dim=1); `latent` is the
    clean target. Reads lazily from either format, so a dataset larger than memory still trains.
    """

    def __init__(self, path: str | Path, inpainting: bool = False) -> None:
        self.path, self.inpainting = Path(path), inpainting
        arrays = open_latents(self.path)
        if inpainting and "masked_latents" not in arrays:
            raise GloError(
                f"{self.path}: exported without a mask; run glo.run with mask=boxes|strokes|folder"
            )
        require(
            self.path, arrays, (*REQUIRED, "initial_latents", *(INPAINTING if inpainting else ()))
        )
        self.ids = [str(i) for i in _in_memory(arrays["ids"])]
        self._arrays: dict[str, Any] | None = None
        self._pid = 0  # the process that opened _arrays

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn (macOS, Windows) receive the dataset pickled: an open
        # HDF5 file cannot be, and a memory map would be copied whole, so each worker opens the file
        # itself
        return {**self.__dict__, "_arrays": None, "_pid": 0}

    def __getitem__(self, i: int) -> dict[str, Any]:
        # a forked worker must not read through its parent's HDF5 handle
        if self._pid != os.getpid():
            self._arrays, self._pid = open_latents(self.path), os.getpid()
        keys = {"latent": "latents", "initial_latent": "initial_latents"}
        if self.inpainting:
            keys.update(
                mask="latent_masks",
                masked_latent="masked_latents",
                initial_masked_latent="initial_masked_latents",
            )
        try:
            return {
                "id": self.ids[i],
                **{
                    k: torch.from_numpy(np.array(self._arrays[a][i], dtype=np.float32))
                    for k, a in keys.items()
                },
            }
        except OSError as e:
            raise damaged(self.path, e) from None
