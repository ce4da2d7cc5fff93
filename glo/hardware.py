"""What this machine is, which decoder precision it runs natively, and what a decode needs in memory.

Reduced precision is only a speed-up where the hardware computes in it: on a CPU without native bf16
(AVX2 only) autocast emulates bf16 and one decode + backward gets over 100x slower. So `precision=auto`
decides from the hardware's capability, never from one machine's benchmark, and every figure says
which machine it was measured on. The decoder's speed and memory switches (`Speed`) sit beside the memory count.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from glo import GloError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # the decoder's autocast dtype


@dataclass(frozen=True)
class Speed:
    """The decoder's speed and memory switches (`speed:` in conf/run.yaml); none changes the result beyond
    float rounding (tiling blends seams)."""

    channels_last: bool  # NHWC memory layout
    checkpointing: bool  # recompute decoder activations in backward instead of storing them
    tile_size: int       # > 0: decode images larger than this many pixels in overlapping tiles

    def __post_init__(self) -> None:
        for key in ("channels_last", "checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise GloError(f"{key}={getattr(self, key)!r}: must be true or false")
        t = self.tile_size
        # diffusers' tiles overlap by a quarter: below 64 px the pieces at an image's edge can be narrower than a
        # conv's kernel (tile_size=8 and 16 ended in tracebacks)
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t % 8 or 0 < t < 64:
            raise GloError(f"tile_size={t!r}: must be 0 (no tiling) or a multiple of 8 from 64 up")


def check_precision(requested: str) -> None:
    """One line naming what `precision=` accepts, if `requested` is not among it."""
    if requested != "auto" and requested not in PRECISIONS:
        raise GloError(f"precision={requested}: must be one of auto, {', '.join(PRECISIONS)}")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), not by emulation."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def gpu_native_bf16(device: torch.device) -> bool:
    """True where the GPU computes bf16 in hardware: compute capability 8.0 (Ampere) and newer, or ROCm.
    torch.cuda.is_bf16_supported() also says True where bf16 is only emulated (T4, V100), where fp16 is fast."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def emulated(precision: str, device: torch.device) -> bool:
    """Reduced precision on a CPU without native bf16: autocast emulates it, over 100x slower per pass."""
    return precision != "fp32" and device.type == "cpu" and not cpu_native_bf16()


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """`auto` -> the fastest precision this device runs natively, with the reason; anything else is forced."""
    check_precision(requested)
    if requested != "auto":  # forcing it on the wrong hardware is allowed, but never silently
        note = ""
        if emulated(requested, device):
            note = "; this CPU has no native bf16, so it is emulated: each pass over 100x slower than fp32"
        elif requested == "fp16" and device.type == "cpu":
            note = ("; fp16 is meant for GPUs without bf16: on a CPU with native bf16, bf16 is the fast dtype "
                    "(fp16 measured 2x slower than fp32 on an Intel Xeon with AVX512-FP16)")
        elif requested == "bf16" and device.type == "cuda" and not gpu_native_bf16(device):
            note = (f"; {torch.cuda.get_device_name(device)} has no native bf16 (before Ampere), so it is emulated: "
                    "fp16 is this GPU's fast dtype")
        return requested, f"forced by precision={requested}{note}"
    if device.type == "cuda":
        if gpu_native_bf16(device):
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} has native bf16"
        return "fp16", f"auto: {torch.cuda.get_device_name(device)} has no native bf16 (before Ampere), fp16 instead"
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not emulated("bf16", device):
            return "bf16", f"auto: {cpu_model()} ({capability}) has native bf16"
        return "fp32", f"auto: {cpu_model()} ({capability}) has no native bf16 (it would be emulated, far slower)"
    return "fp32", f"auto: no reduced precision chosen for {device.type}"


def out_of_memory(e: BaseException) -> bool:
    """The device ran out of memory: torch.OutOfMemoryError on a GPU; a RuntimeError from the CPU's (or MPS's)
    allocator, which torch gives no class of its own."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't allocate memory", "out of memory")))


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: a GPU's free memory, or on Linux the RAM this process may still use
    (MemAvailable, or less where a cgroup caps it); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    kb = _number(_read(Path("/proc/meminfo")), "MemAvailable:")
    return min((b for b in (None if kb is None else kb * 1024, cgroup_memory_left()) if b is not None), default=None)


PROC_CGROUP, CGROUP_FS = Path("/proc/self/cgroup"), Path("/sys/fs/cgroup")


def cgroup_memory_left() -> int | None:
    """What this process's cgroups still allow: the tightest limit on its cgroup or an ancestor, less what is
    used there, reclaimable file cache counted as free; None without a limit. Containers and SLURM jobs cap
    memory so, and MemAvailable shows the whole machine's: their OOM killer ends a run without a word."""
    left = []
    for line in _read(PROC_CGROUP).splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, where it is mounted whole (in v1+v2 hybrids it holds no memory files)
            root, files = CGROUP_FS, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root = CGROUP_FS / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = root / path.lstrip("/")  # in a container's namespace this may not exist: its root is its own
        for level in [folder, *folder.parents]:
            left.append(_limit_left(level, *files))
            if level == root:
                break
    return min((b for b in left if b is not None), default=None)


def _limit_left(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit, usage = (folder / limit_file).read_text().strip(), int((folder / usage_file).read_text())
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
    """The number after `key` in lines of "key number ..." (/proc/meminfo, a cgroup's memory.stat)."""
    return next((int(line.split()[1]) for line in text.splitlines() if line.split()[:1] == [key]), None)


def saved_bytes(vae: torch.nn.Module, z: Tensor, dtype: torch.dtype | None, recompute: bool = False) -> int:
    """Bytes autograd keeps for the backward of vae.decode(z), weights not counted: the least a decode + backward
    needs. Autocast's reduced-precision copies of the weights are counted: they do not grow with the image, the
    rest does (decode_memory tells them apart). recompute (with gradient checkpointing on): what the largest
    checkpointed block saves when backward recomputes it, all of it at once before that block's backward runs."""
    weights = {p.data_ptr() for p in vae.parameters()}
    kept: dict[int, dict[tuple, int]] = {}  # by checkpointed block (0: outside every block)
    block = [0]

    def pack(t: Tensor) -> Tensor:
        if t.data_ptr() not in weights:  # a tensor saved twice counts once
            kept.setdefault(block[0], {})[t.data_ptr(), t.dtype, tuple(t.shape)] = t.numel() * t.element_size()
        return t

    def unchecked(module: torch.nn.Module, *args: Tensor) -> Tensor:  # the block as backward recomputes it
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
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad(), \
                torch.autocast(z.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            vae.decode(z.detach().requires_grad_())
    finally:
        if recompute:
            vae.model.enable_gradient_checkpointing()  # diffusers' own checkpointing again
    if recompute:
        return max((sum(b.values()) for k, b in kept.items() if k), default=0)
    return sum(sum(b.values()) for b in kept.values())


def decode_memory(vae: torch.nn.Module, dtype: torch.dtype | None) -> tuple[float, float]:
    """(bytes kept once, bytes per image per 64x64 px) that a decode + backward saves, from saved_bytes at 64 and
    128 px. Autocast keeps its reduced-precision copies of the weights once, whatever the image: for the SD VAE in
    bf16 that is 94 MiB, and scaled by area as if it were activations it made a 512 px estimate 3x too big. With
    gradient checkpointing, the larger of what it keeps and what the largest block's recompute keeps: counting
    only the first put the SD VAE's checkpointed need at 512 px (bf16) at 408 MiB, against 1067 MiB for the second."""
    c, device = vae.model.config.latent_channels, next(vae.parameters()).device
    checkpointing = vae.model.is_gradient_checkpointing

    def count(n: int) -> int:
        z = torch.zeros(1, c, n, n, device=device)
        return max(saved_bytes(vae, z, dtype), saved_bytes(vae, z, dtype, recompute=True) if checkpointing else 0)

    small, large = count(8), count(16)
    per_image = (large - small) / 3  # what grows with the area: 4x the pixels, 3x more saved
    return max(0.0, small - per_image), per_image


def machine() -> dict:
    """The machine a figure was measured on: CPU model and capability, threads, GPU if any."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": cpu_native_bf16(), "cpus": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
