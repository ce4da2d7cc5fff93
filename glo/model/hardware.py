"""What this machine is, which decoder precision it runs natively, and what a decode needs in
memory.

Reduced precision is only a speed-up where the hardware computes in it: on a CPU without native bf16
(AVX2 only) autocast emulates bf16 and one decode + backward gets over 100x slower. So
`precision=auto` decides from the hardware's capability, never from one machine's benchmark, and
every figure says which machine it was measured on. The decoder's speed and memory switches
(`Speed`) sit beside the memory count.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from glo import GloError
from glo.model.schema import Built, NonNegative

# the decoder's autocast dtype
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Speed(Built):
    """The decoder's speed and memory switches (their defaults and meanings: conf/run.yaml); none
    changes the result beyond float rounding (tiling blends seams)."""

    channels_last: bool
    checkpointing: bool
    tile_size: NonNegative

    def model_post_init(self, context: object) -> None:
        t = self.tile_size
        # diffusers' tiles overlap by a quarter: below 64 px the pieces at an image's edge can be
        # narrower than a conv's kernel
        if t % 8 or 0 < t < 64:
            raise GloError(f"tile_size={t}: must be 0 (no tiling) or a multiple of 8 from 64 up")


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
    """True where the GPU computes bf16 in hardware: compute capability 8.0 (Ampere) and newer, or
    ROCm. torch.cuda.is_bf16_supported() also says True where bf16 is only emulated (T4, V100),
    where fp16 is fast."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def emulated(precision: str, device: torch.device) -> bool:
    """Reduced precision on a CPU without native bf16: autocast emulates it, over 100x slower per
    pass."""
    return precision != "fp32" and device.type == "cpu" and not cpu_native_bf16()


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """`auto` -> the fastest precision this device runs natively, with the reason; anything else is
    forced."""
    check_precision(requested)
    if requested != "auto":  # forcing it on the wrong hardware is allowed, but never silently
        note = ""
        if emulated(requested, device):
            note = (
                "; this CPU has no native bf16, so it is emulated: each pass over 100x slower "
                "than fp32"
            )
        elif requested == "fp16" and device.type == "cpu":
            note = (
                "; fp16 is meant for GPUs without bf16: on a CPU with native bf16, bf16 is the "
                "fast dtype (on a CPU fp16 runs slower than fp32, even with AVX512-FP16)"
            )
        elif requested == "bf16" and device.type == "cuda" and not gpu_native_bf16(device):
            note = (
                f"; {torch.cuda.get_device_name(device)} has no native bf16 (before Ampere), so it "
                "is emulated: fp16 is this GPU's fast dtype"
            )
        return requested, f"forced by precision={requested}{note}"
    if device.type == "cuda":
        if gpu_native_bf16(device):
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} has native bf16"
        return (
            "fp16",
            f"auto: {torch.cuda.get_device_name(device)} has no native bf16 (before Ampere), fp16 "
            "instead",
        )
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        if not emulated("bf16", device):
            return "bf16", f"auto: {cpu_model()} ({capability}) has native bf16"
        return (
            "fp32",
            f"auto: {cpu_model()} ({capability}) has no native bf16 (it would be emulated, far "
            "slower)",
        )
    return "fp32", f"auto: no reduced precision chosen for {device.type}"


def machine() -> dict:
    """The machine a figure was measured on: CPU model and capability, threads, GPU if any."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_native_bf16(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def pick_device(name: str) -> torch.device:
    """`auto` = CUDA, else Apple's MPS, else CPU; any other name is taken as given, if this machine
    has it."""
    if name == "cuda" and not torch.cuda.is_available():
        why, fix = "a CPU-only build", "install torch's CUDA build into .venv"
        if torch.version.cuda is not None:
            why = f"built for CUDA {torch.version.cuda}, but no GPU is visible"
            fix = "check the driver and CUDA_VISIBLE_DEVICES"
        raise GloError(
            f"device=cuda: torch {torch.__version__} is {why}; use device=auto or device=cpu, or "
            f"{fix}"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise GloError(
            "device=mps: Apple's MPS is not available here; use device=auto or device=cpu"
        )
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
