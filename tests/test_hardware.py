"""precision=auto follows the hardware's capability, and reduced precision really changes the arithmetic."""
from pathlib import Path

import pytest
import torch

from glo.method.engine import optimize
from glo.method.losses import PixelLoss
from glo.model import hardware, memory
from glo.report.render import describe
from tests.conftest import photos, settings

L2 = PixelLoss("l2", l1=0.0, l2=1.0)


@pytest.mark.parametrize("native,expected", [(False, "fp32"), (True, "bf16")])
def test_auto_picks_bf16_only_where_the_cpu_has_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
    used, reason = hardware.resolve_precision("auto", torch.device("cpu"))
    assert used == expected and reason.startswith("auto:") and ("no native bf16" in reason) == (not native)
    assert f"({torch.backends.cpu.get_cpu_capability()})" in reason


@pytest.mark.parametrize("capability,hip,expected", [((8, 0), None, "bf16"), ((9, 0), None, "bf16"),
                                                     ((7, 5), None, "fp16"), ((7, 0), None, "fp16"),
                                                     ((7, 0), "6.2", "bf16")])
def test_auto_on_a_gpu_picks_bf16_where_native_else_fp16(monkeypatch, capability, hip, expected):
    """A T4 (7.5) or V100 (7.0) emulates bf16, though torch.cuda.is_bf16_supported() says True there; on ROCm
    torch counts bf16 as supported whatever the capability number."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability if device.index == 1 else (0, 0))
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU {device}")
    used, reason = hardware.resolve_precision("auto", torch.device("cuda", 1))
    assert used == expected and reason.startswith("auto: GPU cuda:1 ")  # the GPU it runs on, named
    assert hardware.resolve_precision("auto", torch.device("mps")) == ("fp32", "auto: no reduced precision chosen for mps")


@pytest.mark.parametrize("native", [False, True])
def test_emulated_means_reduced_precision_on_a_cpu_without_native_bf16(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [hardware.emulated(p, cpu) for p in ("fp32", "bf16", "fp16")] == [False, not native, not native]
    assert not hardware.emulated("bf16", cuda)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("forced", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_never_overridden_but_an_emulated_one_says_so(monkeypatch, forced, native):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: native)
    used, reason = hardware.resolve_precision(forced, torch.device("cpu"))
    assert used == forced
    slow = "; this CPU has no native bf16, so it is emulated: each pass over 100x slower than fp32"
    fp16 = "; fp16 is meant for GPUs without bf16: on a CPU with native bf16, bf16 is the fast dtype"
    note = slow if forced != "fp32" and not native else fp16 if forced == "fp16" else ""
    assert reason.startswith(f"forced by precision={forced}{note}") and (note or reason.endswith(forced)), reason


@pytest.mark.parametrize("capability,forced,warned", [((7, 5), "bf16", True), ((7, 5), "fp16", False),
                                                      ((8, 0), "bf16", False)])
def test_bf16_forced_on_a_gpu_before_ampere_says_it_is_emulated(monkeypatch, capability, forced, warned):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    used, reason = hardware.resolve_precision(forced, torch.device("cuda"))
    assert used == forced and reason.startswith(f"forced by precision={forced}")
    assert ("Tesla T4 has no native bf16 (before Ampere), so it is emulated" in reason) == warned, reason


def test_machine_names_cpu_and_capability():
    m = hardware.machine()
    assert m["cpu"] and m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["cpu_capability"] in describe(m)


def test_bf16_decoder_is_close_to_fp32_but_not_equal(tiny_vae):
    """Catches autocast being silently ignored (results would be bitwise fp32) or misapplied (far off)."""
    x = photos(2, size=32)
    z0 = tiny_vae.encode(x)
    kw = dict(lr=0.1, max_steps=3, rel_tol=0.0, window=5)
    full = optimize(tiny_vae.decode, z0, x, L2, settings(**kw))
    half = optimize(tiny_vae.decode, z0, x, L2, settings(**kw, precision="bf16"))
    assert not torch.equal(full.loss_curves, half.loss_curves)
    assert torch.allclose(full.loss_curves, half.loss_curves, rtol=0.03)  # Adam's normalization lets single
    assert (half.final_loss < half.initial_loss).all()                      # elements differ; the losses stay close


@pytest.mark.parametrize("optim", ["adam", "lbfgs"])
def test_fp16_latents_get_the_fp32_gradient_at_sd_sizes(optim):
    """precision=auto picks fp16 on GPUs without bf16. A per-pixel mean's gradient (~2 * error / pixels) is below
    fp16's range at 512 px: without loss scaling the latents got all-zero gradients and never moved (measured with
    the stand-in VAE). A cheap decoder with an fp16 layer shows the same: here every pixel's error is 0.01."""
    conv = torch.nn.Conv2d(4, 3, 1)
    decode = lambda z: torch.nn.functional.interpolate(conv(z), scale_factor=8)  # noqa: E731
    z0 = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        x = decode(z0) + 0.01
    kw = dict(optim=optim, lr=0.01, max_steps=1, rel_tol=0.0, anderson=0)
    full = optimize(decode, z0, x, L2, settings(**kw))
    half = optimize(decode, z0, x, L2, settings(**kw, precision="fp16"))
    assert (full.final_loss < full.initial_loss).all() and (half.final_loss < half.initial_loss).all()
    moved_full, moved_half = full.latents - z0, half.latents - z0
    cos = torch.nn.functional.cosine_similarity(moved_full.flatten(1), moved_half.flatten(1))
    assert (cos > 0.99).all(), cos


def test_available_memory_is_linux_memavailable_or_the_gpus_free_memory(monkeypatch):
    meminfo = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n"
    monkeypatch.setattr(hardware.Path, "read_text", lambda self: meminfo if str(self) == "/proc/meminfo" else "")
    assert memory.available_memory(torch.device("cpu")) == 600 * 1024  # free + reclaimable cache, not MemFree
    assert memory.available_memory(torch.device("mps")) is None  # no figure there: no check
    meminfo = "MemTotal:       1000 kB\n"  # a kernel without the field
    assert memory.available_memory(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 + device.index, 456))  # (free, total)
    assert memory.available_memory(torch.device("cuda", 1)) == 124  # that GPU's, not the current one's


@pytest.mark.parametrize("proc,files,left", [
    ("0::/slurm/job_7/step_0", {"slurm/job_7/memory.max": "4000000", "slurm/job_7/memory.current": "1000000",
                                "slurm/job_7/memory.stat": "anon 9\ninactive_file 500000\nactive_file 7\n",
                                "slurm/job_7/step_0/memory.max": "max", "slurm/job_7/step_0/memory.current": "1"},
     3500000),  # v2: the job's limit, an ancestor's, binds; its reclaimable file cache counts as free
    ("0::/docker/abc", {"memory.max": "3000", "memory.current": "1000"}, 2000),  # a container sees its own as root
    ("12:memory:/a\n0::/", {"memory/a/memory.limit_in_bytes": "2000", "memory/a/memory.usage_in_bytes": "500",
                             "memory/a/memory.stat": "inactive_file 9\ntotal_inactive_file 100\n",
                             "memory/memory.limit_in_bytes": "9000", "memory/memory.usage_in_bytes": "4000"},
     1600),  # v1: the tighter level (2000 - 500 + 100 against 9000 - 4000), with v1's hierarchical file cache
    ("4:memory:/a", {"memory/a/memory.limit_in_bytes": "9223372036854771712", "memory/a/memory.usage_in_bytes": "5"},
     None),  # v1's "no limit"
    ("1:cpu:/", {}, None),
])
def test_a_cgroup_memory_limit_caps_the_available_memory(monkeypatch, tmp_path, proc, files, left):
    """Containers and SLURM jobs cap memory in a cgroup, where MemAvailable shows the whole machine's."""
    (tmp_path / "cgroup").write_text(proc + "\n")
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text + "\n")
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(memory, "CGROUP_FS", tmp_path / "fs")
    read = memory._read  # the machine's MemAvailable, fixed: the real one moves between two reads
    monkeypatch.setattr(memory, "_read", lambda path: "MemAvailable: 7000 kB\n" if path == Path("/proc/meminfo")
                        else read(path))
    assert memory.cgroup_memory_left() == left
    assert memory.available_memory(torch.device("cpu")) == (7000 * 1024 if left is None else left)
