"""Memory: the decoder's need counted before any image, refused in one line with the switches that fit, and
running out anyway is one line naming what resumes."""
import json
import math

import numpy as np
import pytest
import torch

import glo.app.config
import glo.app.module
import glo.model.hardware
import glo.model.memory
import glo.run
from glo import GloError
from glo.app.cli import one_line_errors
from glo.app.config import built
from glo.model.hardware import Speed
from glo.model.memory import decode_memory, saved_bytes
from glo.model.vae import load_vae
from tests.conftest import FAST, as_in_hydra_main, run_config

G = 2**30


def test_out_of_memory_is_one_line_and_the_command_it_names_resumes_after_the_finished_images(tmp_path, monkeypatch,
                                                                                             capsys):
    """The second batch meets the CPU allocator's real error; glo.run runs in this process, as its __main__ does.
    The resumed run, on "another CPU", adds its session beside the first in metadata.json."""
    fit_batch, calls = glo.app.module.fit_batch, []

    def second_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            torch.empty(2**60, dtype=torch.uint8)  # more than any address space: the CPU allocator's own error
        return fit_batch(*args, **kwargs)

    monkeypatch.setattr(glo.app.module, "fit_batch", second_runs_out)
    args = [*FAST, "data.limit=2", "batch_size=1", "logger=none", "report=false"]
    with pytest.raises(SystemExit), one_line_errors("glo"):  # as glo.run's main wraps run()
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and errors[0].startswith("glo: error: out of memory on cpu fitting 1 image(s) of 64 px "
                                                     "(") and "can't allocate memory" in errors[0], errors
    assert errors[0].endswith("the images finished are kept: run the same command with checkpointing=true to resume "
                              "after them, or start a new directory with data.size=32 or less")
    (shard,) = (tmp_path / "shards").glob("*.npz")
    kept = shard.read_bytes()

    monkeypatch.setattr(glo.app.module, "fit_batch", fit_batch)
    here = glo.model.hardware.machine()
    monkeypatch.setattr(glo.model.hardware, "machine", lambda: {**here, "cpu": "another CPU"})  # resumed elsewhere
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args, "checkpointing=true"))
    assert list(np.load(tmp_path / "latents.npz")["ids"]) == ["astronaut", "coffee"] and shard.read_bytes() == kept
    sessions = json.loads((tmp_path / "metadata.json").read_text())["sessions"]  # both machines named
    assert [(s["machine"]["cpu"], s["images_done_before"]) for s in sessions] == [(here["cpu"], 0), ("another CPU", 1)]


def test_running_out_of_memory_with_checkpointing_on_offers_a_smaller_batch_only(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's own error

    monkeypatch.setattr(glo.app.module, "fit_batch", out_of_memory)
    with pytest.raises(SystemExit), one_line_errors("glo"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "checkpointing=true", "logger=none", "report=false"))
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glo: error:")]
    assert error.endswith("kept: run the same command with batch_size=1 to resume after them, or start a new "
                          "directory with data.size=32 or less"), error  # FAST: batch_size=2


@pytest.mark.parametrize("out_of_memory", [True, False])
def test_out_of_memory_in_any_tool_is_one_line_and_other_runtime_errors_keep_their_traceback(capsys, out_of_memory):
    with pytest.raises(SystemExit if out_of_memory else RuntimeError) as e, one_line_errors("glo.evaluate"):
        torch.empty(2**60, dtype=torch.uint8) if out_of_memory else torch.ones(2) @ torch.ones(3)
    err = capsys.readouterr().err
    assert err == "" if not out_of_memory else (e.value.code == 1 and err.count("\n") == 1 and err.startswith(
        "glo.evaluate: error: out of memory (") and err.endswith("run it again with a smaller batch size or image size\n"))


@pytest.fixture(scope="module")
def probed() -> tuple:
    """The stand-in and its bf16 memory probes without and with checkpointing, measured once (bf16 is emulated, so
    slow, on CPUs without it): the refusal cases below test the policy on them."""
    cfg = run_config(*FAST)
    vae = glo.app.config.load_model(cfg, built(Speed, cfg))
    plain = decode_memory(vae, torch.bfloat16)
    vae.model.enable_gradient_checkpointing()
    ckpt = decode_memory(vae, torch.bfloat16)
    vae.model.disable_gradient_checkpointing()
    assert ckpt[0] + ckpt[1] < plain[0] + plain[1] < ckpt[0] + 3 * ckpt[1]  # less, counting the largest recompute
    return vae, plain, ckpt


@pytest.mark.parametrize("checkpointing,batch,free,switches,size", [  # size: 64 px * sqrt(room / need), to 8s
    (False, 3, lambda plain, ckpt: plain[0] + 1.95 * plain[1], "batch_size=1 checkpointing=true", 48),
    (False, 1, lambda plain, ckpt: ckpt[0] + ckpt[1], "checkpointing=true", 40),  # a batch of 1 is too much already
    (False, 1, lambda plain, ckpt: ckpt[0] + ckpt[1] - 1, None, 40),
    (True, 3, lambda plain, ckpt: ckpt[0] + 2 * ckpt[1], "batch_size=2", 48),
])
def test_a_memory_refusal_offers_only_the_switches_whose_lower_bound_fits(checkpointing, batch, free, switches, size,
                                                                            monkeypatch, probed):
    """In bf16, where autocast's weight copies are kept once and the activations per image (fixed, per image)."""
    vae, plain, ckpt = probed
    if checkpointing:
        vae.model.enable_gradient_checkpointing()
    monkeypatch.setattr(glo.model.memory, "decode_memory",
                        lambda vae, dtype: ckpt if vae.model.is_gradient_checkpointing else plain)
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: math.ceil(free(plain, ckpt)))
    speed = built(Speed, run_config(*FAST, f"checkpointing={checkpointing}"))
    try:
        with pytest.raises(GloError, match=f"^{batch} image\\(s\\) of 64 px need at least") as e:
            glo.model.memory.check_memory(speed, vae, 64, "bf16", batch, 1)
        assert vae.model.is_gradient_checkpointing == checkpointing  # the VAE is left as it was
    finally:
        vae.model.disable_gradient_checkpointing()
    resume = f"run the same command with {switches} to resume after them, or " if switches else ""
    assert str(e.value).split("kept: ")[1] == f"{resume}start a new directory with data.size={size} or less", str(e.value)


def test_loss_curves_and_rows_that_ram_cannot_hold_are_refused_in_one_line(monkeypatch):
    """Each image keeps a curve of max_steps floats; the engine holds a batch's (masked rows too), an NPZ merge
    every row twice, HDF5 one shard: max_steps=1e9 was killed by the kernel without a word."""
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: 2**30)
    glo.model.memory.check_rows(10**8, 1, 2, 64, False, "npz", 4)  # 0.8 GB of curves fit
    with pytest.raises(GloError, match=r"^max_steps=100000000, 1 image\(s\) of 64 px: .*1\.5 GiB of RAM, and 1\.0 GiB"):
        glo.model.memory.check_rows(10**8, 1, 2, 64, True, "npz", 4)  # the masked rows double the batch's curves
    glo.model.memory.check_rows(1000, 20000, 4, 256, False, "hdf5", 4)  # streamed shard by shard
    with pytest.raises(GloError, match="lower max_steps .*; export.format=hdf5 merges shard by shard$"):
        glo.model.memory.check_rows(1000, 20000, 4, 256, False, "npz", 4)  # 1.4 GB of rows held twice
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: None)
    glo.model.memory.check_rows(10**12, 10**6, 8, 1024, True, "npz", 4)  # unknown: no check


def test_a_run_whose_curves_do_not_fit_is_refused_before_loading_the_vae(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(glo.run, "load_model", lambda *a: pytest.fail("the VAE was loaded"))
    with pytest.raises(SystemExit), one_line_errors("glo"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "max_steps=1000000000000", "logger=none"))
    assert capsys.readouterr().err == "glo: error: max_steps=1000000000000: must be <= 100000\n"


def test_on_a_cpu_each_process_needs_its_own_memory(monkeypatch, tiny_vae):
    speed = built(Speed, run_config(*FAST))
    fixed, per_image = decode_memory(tiny_vae, None)
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: math.ceil(fixed + 3 * per_image))
    glo.model.memory.check_memory(speed, tiny_vae, 64, "fp32", 3, 1)  # 3 images of 64 px fit once
    with pytest.raises(GloError, match="^3 image"):
        glo.model.memory.check_memory(speed, tiny_vae, 64, "fp32", 3, 2)  # not twice


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_batch_that_fits_with_little_to_spare_is_run_with_a_warning(monkeypatch, tiny_vae, caplog, checkpointing):
    """The count is a lower bound (peak RSS measured up to 3.39x it): within 3x of the free memory the run goes ahead, and
    its log says it may still run out, before a kernel OOM kill would end it without a word."""
    speed = built(Speed, run_config(*FAST, f"checkpointing={checkpointing}"))
    fixed, per_image = decode_memory(tiny_vae, None)
    need = fixed + 3 * per_image
    for free, warned in ((3.01 * need, False), (2.99 * need, True)):
        caplog.clear()
        monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: math.ceil(free))
        glo.model.memory.check_memory(speed, tiny_vae, 64, "fp32", 3, 1)
        assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
            f"3 image(s) of 64 px need at least 0.0 GiB on cpu for the decoder's backward, and 0.0 GiB is available: "
            f"the count is a lower bound, so the run may still run out of memory (on a CPU the kernel then ends it "
            f"without a message){'' if checkpointing else '; checkpointing=true needs less'}"] * warned
    caplog.clear()
    glo.model.memory.check_memory(speed, tiny_vae, 64, "fp32", 3, 1, local_rank=1)  # another DDP rank: rank 0 has said it
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class _CountedVAE:
    """What check_memory asks of a VAE: its device, and a switch for checkpointing that the count below reads."""

    def __init__(self, device: str) -> None:
        self.device, self.model = torch.device(device), self
        self.checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.checkpointing = False


@pytest.mark.parametrize("device, processes, counts, size, batch, free, line", [
    # 2 CPU processes share the RAM: (1 + 0.5 * 4 * 2) * 2 = 10 GiB; room per process 9/2 - 1 = 3.5 GiB, 2 per image
    ("cpu", 2, {False: (1, 0.5), True: (1, 0.125)}, 128, 2, 9, "2 image(s) of 128 px need at least 10.0 GiB on cpu "
     "for the decoder's backward, and 9.0 GiB is available; the images finished are kept: run the same command with "
     "batch_size=1 checkpointing=true to resume after them, or start a new directory with data.size=112 or less"),
    ("cpu", 2, {False: (1, 0.5), True: (1, 0.5)}, 128, 2, 9, "...: run the same command with batch_size=1 to resume "
     "after them, or start a new directory with data.size=112 or less"),  # checkpointing would save nothing
    ("cpu", 1, {False: (1, 0.5), True: (1, 0.5)}, 128, 2, 3, "...: run the same command with batch_size=1 to resume "
     "after them, or start a new directory with data.size=88 or less"),  # room for exactly one image
    ("cpu", 1, {False: (1, 0.5), True: (1, 0.5)}, 128, 2, 2.5, "...kept: start a new directory with data.size=72 or "
     "less"),  # room for less than one
    ("cpu", 1, {False: (4, 0.5), True: (4, 0.5)}, 64, 1, 3, "...: start a new directory with data.size=8 or less"),
    ("cuda", 2, {False: (1, 0.5), True: (1, 0.5)}, 64, 2, 2.5, "2 image(s) of 64 px need at least 2.0 GiB on cuda for "
     "the decoder's backward, and 2.5 GiB is available: the count is a lower bound, so the run may still run out of "
     "memory (on a CPU the kernel then ends it without a message); checkpointing=true needs less"),  # a GPU each
    ("cpu", 1, {False: (1, 0.5), True: (1, 0.5)}, 64, 2, 6, None),  # 3x the need is free: no warning
])
def test_the_memory_count_with_round_numbers(monkeypatch, caplog, device, processes, counts, size, batch, free, line):
    """The arithmetic of check_memory, in GiB: the count grows with the area and the batch, CPU processes share the
    machine's RAM and GPU processes have a device each, a switch is offered only where its own count fits, and the
    smaller size is the one whose count fits (64 px * sqrt(room / need at 64 px), down to a multiple of 8)."""
    vae = _CountedVAE(device)
    monkeypatch.setattr(glo.model.memory, "decode_memory", lambda v, dtype: tuple(x * G for x in counts[v.checkpointing]))
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda d: free * G if d == vae.device else None)
    speed = built(Speed, run_config(*FAST))
    if line is None or "lower bound" in line:
        glo.model.memory.check_memory(speed, vae, size, "fp32", batch, processes)
        assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == ([("glo", "WARNING", line)] if line
                                                                                  else [])
        return
    with pytest.raises(GloError) as e:
        glo.model.memory.check_memory(speed, vae, size, "fp32", batch, processes)
    assert str(e.value) == line if not line.startswith("...") else str(e.value).endswith(line[3:]), str(e.value)
    assert not vae.checkpointing  # the VAE is left as it was


@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_each_ddp_process_checks_memory_as_the_local_rank_lightning_gives_it(tmp_path, monkeypatch, launcher):
    """srun sets no LOCAL_RANK, only SLURM_LOCALID: every rank warned. Lightning's local rank knows both."""
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))  # the Trainer sets it to 1
    env = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_LOCALID": "1", "SLURM_PROCID": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_NAME": "glo", "SLURM_JOB_ID": "5", "SLURM_NODELIST": "node1"}
    if launcher == "torchrun":
        env = {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    seen = []

    def stop(*args) -> None:
        seen.append(args[6:])
        raise GloError("checked")

    monkeypatch.setattr(glo.model.memory, "check_memory", stop)
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=none", "report=false"]
    with pytest.raises(GloError, match="^checked$"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, *ddp))
    assert seen == [(1,)]


@pytest.mark.parametrize("largest", ["up_blocks.3", "mid_block"])
def test_a_checkpointed_count_holds_the_largest_blocks_recompute(tiny_vae, largest):
    """Backward recomputes a checkpointed block whole before its backward runs: what that block saves is alive at
    once. Counting only what checkpointing keeps put the SD VAE's need at 512 px (bf16) at 408 MiB against 1067.
    Measured here against the largest block run alone, with its input from a plain decode: the full-resolution up
    block, or the middle block where it is wide enough to be larger (it checkpoints blocks of its own inside)."""
    vae, z = tiny_vae, torch.zeros(1, 4, 16, 16)
    if largest == "mid_block":
        config = {**vae.model.config, "block_out_channels": [2, 2, 2, 256], "norm_num_groups": 2}
        vae = load_vae("mid_heavy", config={k: v for k, v in config.items() if not k.startswith("_")})
    last = vae.model.decoder.get_submodule(largest)
    inputs = []
    hook = last.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().requires_grad_()))
    plain = saved_bytes(vae, z, None)
    hook.remove()
    weights, alone = {p.data_ptr() for p in vae.parameters()}, {}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: alone.setdefault(t.data_ptr(), t.numel() * 4) and t,
                                                  lambda t: t):
        last(inputs[0])
    alone = {k: v for k, v in alone.items() if k not in weights}
    vae.model.enable_gradient_checkpointing()
    try:
        kept, recomputed = saved_bytes(vae, z, None), saved_bytes(vae, z, None, recompute=True)
        fixed, per_image = decode_memory(vae, None)
        assert saved_bytes(vae, z, None) == kept and vae.model.is_gradient_checkpointing  # left checkpointing
    finally:
        vae.model.disable_gradient_checkpointing()
    assert recomputed == sum(alone.values())
    assert kept < recomputed < plain
    assert fixed + 4 * per_image == pytest.approx(recomputed, rel=0.001)  # 128 px: 4x the area of 64 px


def test_the_memory_count_grows_with_the_area_and_autocasts_weight_copies_are_kept_once(tiny_vae):
    """From probes at 64 and 128 px, the count at 256 px; autocast's bf16 weight copies are kept once, not per
    image (counted per image, the SD VAE's estimate at 512 px came out 3x too big)."""
    vae = tiny_vae
    fixed, per_image = decode_memory(vae, None)
    assert 0 <= fixed < 0.001 * per_image  # fp32: everything grows with the image
    bf16_fixed, bf16_per_image = decode_memory(vae, torch.bfloat16)
    convolutions = [m for m in vae.model.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert bf16_fixed == pytest.approx(2 * sum(m.weight.numel() for m in convolutions), rel=0.05)  # bf16 weights
    assert bf16_per_image == pytest.approx(per_image / 2, rel=0.05)  # bf16 activations
    for dtype, (f, p) in ((None, (fixed, per_image)), (torch.bfloat16, (bf16_fixed, bf16_per_image))):
        assert saved_bytes(vae, torch.zeros(1, 4, 32, 32), dtype) == pytest.approx(f + 16 * p, rel=0.001)


def test_a_batch_too_big_for_memory_is_refused_before_any_image_with_a_size_that_fits(tmp_path, monkeypatch, capsys,
                                                                                      tiny_vae):
    """Where the kernel's OOM killer acts first, a run too big is killed without a word; glo refuses it up front."""
    fixed, per_64px = decode_memory(tiny_vae, None)  # the VAE of FAST's vae=tiny_random
    free = fixed + per_64px * 4 * 2 * 0.5  # half of 2 images at 128 px
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: math.ceil(free))
    args = [*FAST, "data.size=128", "batch_size=2", "logger=none", "report=false"]
    with pytest.raises(SystemExit), one_line_errors("glo"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args, "batch_size=4"))  # 3 images: a batch of 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glo: error:")]
    assert errors == [f"glo: error: 3 image(s) of 128 px need at least {(fixed + per_64px * 12) / 2**30:.1f} GiB on "
                      f"cpu for the decoder's backward, and {math.ceil(free) / 2**30:.1f} GiB is available; the images "
                      "finished are kept: run the same command with batch_size=1 to resume after them, or start a "
                      "new directory with data.size=72 or less"]  # 128 * sqrt(2/3) / 2 = 73.9; checkpointing: too much
    assert not list((tmp_path / "shards").glob("*.npz"))
    monkeypatch.setattr(glo.model.memory, "available_memory", lambda device: math.ceil(fixed + per_64px * 4 * 2))  # just enough
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path / "big_batch", *args, "data.limit=2", "batch_size=8"))  # 2 left
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    assert len(np.load(tmp_path / "latents.npz")["ids"]) == 3
