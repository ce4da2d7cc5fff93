"""What a batch needs in memory, what the machine can still give, and a refusal naming what fits.

A run that does not fit is refused before it computes anything: on a CPU the kernel's OOM killer
would end it without a message. The need is what autograd keeps in two small probe decodes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from glo import GloError

if TYPE_CHECKING:
    from glo.model.hardware import Speed
    from glo.model.vae import FrozenVAE


def out_of_memory(e: BaseException) -> bool:
    """The device ran out of memory (torch gives the CPU's and MPS's allocators no error class)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError)
        and any(s in str(e) for s in ("can't allocate memory", "out of memory"))
    )


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give (a GPU's free memory; on Linux, RAM and cgroup limits), or
    None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    kb = _number(_read(Path("/proc/meminfo")), "MemAvailable:")
    return min(
        (b for b in (None if kb is None else kb * 1024, cgroup_memory_left()) if b is not None),
        default=None,
    )


PROC_CGROUP, CGROUP_FS = Path("/proc/self/cgroup"), Path("/sys/fs/cgroup")


def cgroup_memory_left() -> int | None:
    """Bytes the tightest memory limit on this process's cgroups still allows, page cache counted as
    free; None without a limit. Containers and SLURM jobs set such limits; MemAvailable does not
    show them."""
    left = []
    for line in _read(PROC_CGROUP).splitlines():
        _, controllers, path = line.split(":", 2)
        # v2, where it is mounted whole (in v1+v2 hybrids it holds no memory files)
        if controllers == "":
            root, files = CGROUP_FS, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root = CGROUP_FS / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        # in a container's namespace this may not exist: its root is its own
        folder = root / path.lstrip("/")
        for level in [folder, *folder.parents]:
            left.append(_limit_left(level, *files))
            if level == root:
                break
    return min((b for b in left if b is not None), default=None)


def _limit_left(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit, usage = (
            (folder / limit_file).read_text().strip(),
            int((folder / usage_file).read_text()),
        )
    except (OSError, ValueError):
        return None
    if limit == "max" or int(limit) >= 2**62:  # v1 writes "no limit" as about 2**63
        return None
    return int(limit) - usage + (_number(_read(folder / "memory.stat"), inactive_key) or 0)


def _read(path: Path) -> str:
    """A kernel file's text, or "" where this system has none."""
    try:
        return path.read_text()
    except OSError:
        return ""


def _number(text: str, key: str) -> int | None:
    """The number after `key` in "key number ..." lines (/proc/meminfo, memory.stat)."""
    return next(
        (int(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [key]), None
    )


def saved_bytes(
    vae: torch.nn.Module, z: Tensor, dtype: torch.dtype | None, recompute: bool = False
) -> int:
    """Bytes autograd keeps for the backward of vae.decode(z), weights not counted.

    Autocast's reduced-precision weight copies are counted. recompute (with gradient checkpointing
    on): what the largest checkpointed block keeps while backward recomputes it."""
    weights = {p.data_ptr() for p in vae.parameters()}
    kept: dict[int, dict[tuple, int]] = {}  # by checkpointed block (0: outside every block)
    block = [0]

    def pack(t: Tensor) -> Tensor:
        if t.data_ptr() not in weights:  # a tensor saved twice counts once
            kept.setdefault(block[0], {})[t.data_ptr(), t.dtype, tuple(t.shape)] = (
                t.numel() * t.element_size()
            )
        return t

    # the block as backward recomputes it
    def unchecked(module: torch.nn.Module, *args: Tensor) -> Tensor:
        if block[0]:  # a block inside a block is recomputed with it
            return module(*args)
        block[0] = id(module)
        try:
            return module(*args)
        finally:
            block[0] = 0

    if recompute:
        vae.model.enable_gradient_checkpointing(unchecked)
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.enable_grad(),
            torch.autocast(z.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None),
        ):
            vae.decode(z.detach().requires_grad_())
    finally:
        if recompute:
            vae.model.enable_gradient_checkpointing()  # diffusers' own checkpointing again
    if recompute:
        return max((sum(b.values()) for k, b in kept.items() if k), default=0)
    return sum(sum(b.values()) for b in kept.values())


def decode_memory(vae: torch.nn.Module, dtype: torch.dtype | None) -> tuple[float, float]:
    """(bytes kept once, bytes per image per 64x64 px) for a decode + backward, from probes at 64
    and 128 px.

    Autocast's weight copies do not grow with the image, so they are kept apart from what does.
    With checkpointing a block's recompute may keep more than the checkpoints: the larger counts."""
    c, device = vae.latent_channels, next(vae.parameters()).device
    checkpointing = vae.model.is_gradient_checkpointing

    def count(n: int) -> int:
        z = torch.zeros(1, c, n, n, device=device)
        return max(
            saved_bytes(vae, z, dtype),
            saved_bytes(vae, z, dtype, recompute=True) if checkpointing else 0,
        )

    small, large = count(8), count(16)
    per_image = (large - small) / 3  # what grows with the area: 4x the pixels, 3x more saved
    return max(0.0, small - per_image), per_image


def memory_line(why: str, switches: list[str], smaller: int) -> str:
    """Out of memory: what to change. A smaller batch or checkpointing keeps the fingerprint, so the
    same directory resumes; a smaller size starts a new one. tile_size is not offered: without
    checkpointing it raises the peak."""
    resume = (
        f"run the same command with {' '.join(switches)} to resume after them, or "
        if switches
        else ""
    )
    return (
        f"{why}; the images finished are kept: {resume}start a new directory with "
        f"data.size={smaller} or less"
    )


def check_memory(
    speed: Speed,
    vae: FrozenVAE,
    size: int,
    precision: str,
    batch: int,
    processes: int,
    local_rank: int = 0,
) -> None:
    """Refuse a batch the device cannot hold, before computing anything.

    The estimate is a lower bound, so a run that fits is never refused; a switch is offered unless
    even its lower bound is too much, and a tight fit runs with a warning. batch: the largest batch
    this process decodes. local_rank: this process's rank on its machine (rank 0 warns for all)."""
    from glo.model.hardware import PRECISIONS

    free = available_memory(vae.device)
    if free is None:
        return
    share = processes if vae.device.type == "cpu" else 1  # this machine's processes share its RAM
    area, dtype = (size / 64) ** 2, PRECISIONS[precision]
    fixed, per_image = decode_memory(vae, dtype)
    need = (fixed + per_image * area * batch) * share
    why = (
        f"{batch} image(s) of {size} px need at least {need / 2**30:.1f} GiB on {vae.device} for "
        f"the decoder's backward, and {free / 2**30:.1f} GiB is available"
    )
    if need <= free:
        # peak RSS (interpreter and model included) reaches about 3x the count: within 3x, warn
        if 3 * need > free and local_rank == 0:  # DDP: once per machine, not per rank
            hint = "; checkpointing=true needs less" if not speed.checkpointing else ""
            logging.getLogger("glo").warning(
                "%s: the count is a lower bound, so the run may still run out of memory (on a CPU "
                "the kernel then ends it without a message)%s",
                why,
                hint,
            )
        return
    room = free / share - fixed  # what the images may take
    switches = [f"batch_size={int(room // (per_image * area))}"] if room >= per_image * area else []
    if not speed.checkpointing:
        vae.model.enable_gradient_checkpointing()
        fixed_ckpt, per_image_ckpt = decode_memory(vae, dtype)
        vae.model.disable_gradient_checkpointing()
        if (fixed_ckpt + per_image_ckpt * area * batch) * share <= free:
            switches.append("checkpointing=true")
    smaller = max(8, int(64 * (max(room, 0) / (per_image * batch)) ** 0.5) // 8 * 8)
    raise GloError(memory_line(why, switches, smaller))


def check_rows(
    max_steps: int, images: int, batch: int, size: int, masked: bool, fmt: str, channels: int
) -> None:
    """Refuse a run whose exported rows RAM cannot hold, before computing anything.

    Each image keeps a loss curve of max_steps floats; an NPZ merge holds every row twice, HDF5
    merges shard by shard. Counted: curves and latent-shaped columns in float32, a lower bound."""
    # rows live on the CPU wherever the latents are fitted
    free = available_memory(torch.device("cpu"))
    if free is None:
        return
    rows = 2 if masked else 1  # the full image and the masked one are fitted side by side
    # curve + latents and the encoder's, per row
    row = 4 * (max_steps + rows * 2 * channels * (size // 8) ** 2)
    need = max(4 * max_steps * rows * batch, (2 * images if fmt == "npz" else batch) * row)
    if need <= free:
        return
    hdf5 = (
        "; export.format=hdf5 merges shard by shard" if fmt == "npz" and batch * row <= free else ""
    )
    raise GloError(
        f"max_steps={max_steps}, {images} image(s) of {size} px: their loss curves and latents "
        f"need at least {need / 2**30:.1f} GiB of RAM, and {free / 2**30:.1f} GiB is available; "
        f"lower max_steps (the stopping rule ends an image once its loss stops changing){hdf5}"
    )
