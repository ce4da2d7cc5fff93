"""`python -m glo.run` as a user types it: outputs, contract keys, multirun, resume, bad input."""
import contextlib
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from omegaconf.errors import ConfigAttributeError
from PIL import Image

import glo.app.config
import glo.app.module
import glo.method.losses
import glo.model.hardware
import glo.model.memory
import glo.run
from glo import GloError
from glo.app.cli import (
    COMMAND_LINE_ERRORS,
    NoUnreadKeys,
    hydra_main,
    one_line,
    one_line_errors,
)
from glo.app.config import built
from glo.method.settings import Settings
from glo.model.hardware import Speed
from glo.model.memory import decode_memory, saved_bytes
from glo.model.vae import load_vae
from glo.run import validate
from tests.conftest import FAST, run_config, run_glo

SUMMARY_KEYS = {"num_images", "psnr_initial_mean", "psnr_final_mean", "psnr_gain_mean", "images_improved",
                "steps_mean", "seconds_total", "images_per_second"}
ARRAYS = {"ids", "latents", "initial_latents", "steps", "initial_loss", "final_loss", "psnr_initial", "psnr_final",
          "converged", "loss_curves"}


def test_run_writes_the_dataset_and_resumes_without_redoing(finished_run):
    out = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["num_images"] == 3 and summary["psnr_gain_mean"] > 0 and summary["images_improved"] == 3
    a = np.load(out / "latents.npz")
    assert ARRAYS <= set(a.files)
    assert a["latents"].shape == (3, 4, 8, 8) and a["latents"].dtype == np.float32
    assert a["loss_curves"].shape == (3, 8) and a["converged"].dtype == bool
    assert list(a["ids"]) == ["astronaut", "coffee", "chelsea"]
    assert not np.array_equal(a["latents"], a["initial_latents"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["lr"] == 0.1 and meta["vae"]["scaling_factor"] == pytest.approx(0.18215)
    assert meta["image_size"] == 64 and meta["environment"]["torch"].startswith("2.13.0")
    assert {"start_time", "end_time"} <= meta.keys()
    assert meta["precision"] == {"requested": "fp32", "used": "fp32", "reason": "forced by precision=fp32"}
    assert meta["machine"]["cpu_capability"] and "cpu_native_bf16" in meta["machine"]
    assert np.array_equal(a["passes"], a["steps"] + 0.5) and summary["passes_mean"] == pytest.approx(8.5)
    assert list(out.glob("events.out.tfevents.*"))
    shards = sorted((out / "shards").glob("*.npz"))
    assert len(shards) == 2

    events = sorted(out.glob("events.out.tfevents.*"))
    again = run_glo(*FAST, "loss=l2", "lr=0.1", "logger=none", f"hydra.run.dir={out}")  # the logger is not a result
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((out / "shards").glob("*.npz")) == shards  # nothing was redone
    assert sorted(out.glob("events.out.tfevents.*")) == events  # logger=none: the report wrote no event file
    b = np.load(out / "latents.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("ids", "latents", "steps"))


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


def test_a_run_where_most_images_met_a_non_finite_loss_says_so_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glo.method.losses.PixelLoss, "forward", lambda self, pred, target, weight=None:
                        (pred - target).flatten(1).mean(1) * float("nan"))
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "logger=none", "report=false"))
    err = capsys.readouterr().err
    assert "glo: warning: 3 of 3 images met a non-finite loss and kept their best latent" in err


def test_a_resume_that_computes_removes_the_dataset_until_its_merge(tmp_path, monkeypatch, capsys):
    """A shard lost after the merge is computed again; the run dies before merging: no latents.npz, metadata.json,
    summary.json or hf/ of the earlier merge is left to disagree with the shards. The next run merges all again."""
    args = [*FAST, "data.limit=2", "batch_size=1", "logger=none", "report=false"]
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    (tmp_path / "hf").mkdir()  # glo.to_hf's default output, made from this merge
    first = np.load(tmp_path / "latents.npz")["latents"]
    sorted((tmp_path / "shards").glob("shard-*.npz"))[0].unlink()

    def dies(*a, **k):
        raise GloError("killed")

    monkeypatch.setattr(glo.app.module, "fit_batch", dies)
    with pytest.raises(GloError, match="killed"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    assert not [n for n in ("latents.npz", "metadata.json", "summary.json", "hf") if (tmp_path / n).exists()]
    monkeypatch.undo()
    glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *args))
    assert np.array_equal(np.load(tmp_path / "latents.npz")["latents"], first)


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


@pytest.mark.parametrize("where", ["resolver", "node"])
def test_a_stop_inside_omegaconf_is_glo_s_line_alone(capsys, where):
    """OmegaConf replaces an error raised in a resolver (`from None`), and re-raises one raised while it reads a
    node with `full_key:` and `object_type=` lines appended."""
    from omegaconf import OmegaConf

    from glo import Stopped

    line = "stopped by SIGTERM; every file written is whole"

    def stopped() -> None:
        raise Stopped(line if where == "resolver" else f"{line}\n    full_key: \n    object_type=dict")

    OmegaConf.register_new_resolver("glo_test_stop", stopped, replace=True)
    with pytest.raises(SystemExit) as e, one_line_errors("glo.bench"):
        OmegaConf.to_container(OmegaConf.create({"a": "${glo_test_stop:}"}), resolve=True) if where == "resolver" \
            else stopped()
    assert e.value.code == 143
    assert capsys.readouterr().err == "glo.bench: error: stopped by SIGTERM; every file written is whole\n"


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


def sigterm_then(call):
    """`call`, after this process is sent SIGTERM (its handler runs before the next line)."""
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return call(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("where,how,published", [
    ("glo.run.load_model", "stopped by SIGTERM; 0 image(s) are safe", False),  # before the first batch
    ("glo.app.export.LatentExporter.merge", "stopped by SIGTERM during the merge; 3 image(s) are safe", True),
    ("glo.report.evaluation.evaluate", "stopped by SIGTERM; 3 image(s) are safe", True),  # the report
])
def test_sigterm_outside_the_batches_is_one_line_and_exit_143(where, how, published, monkeypatch, tmp_path,
                                                               capsys):
    """Inside the batches Lightning lets the batch in flight finish (test_integrity); elsewhere the default
    handler ended the run without a word, and during the report Lightning's left SIGTERM ignored."""
    import glo.app.export
    import glo.report.evaluation

    owner, name = where.rsplit(".", 1)
    target = {"glo.run": glo.run, "glo.app.export.LatentExporter": glo.app.export.LatentExporter,
              "glo.report.evaluation": glo.report.evaluation}[owner]
    monkeypatch.setattr(target, name, sigterm_then(getattr(target, name)))
    with pytest.raises(SystemExit) as e, one_line_errors("glo"):
        glo.run.run(as_in_hydra_main(monkeypatch, tmp_path, *FAST, "logger=none"))
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if "SIGTERM" in ln] == [
        f"glo: error: {how} in {tmp_path / 'shards'}: run the same command again to resume"], err
    assert (tmp_path / "latents.npz").exists() == published and (tmp_path / "report.md").exists() is False
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the caller's again


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


G = 2**30


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


def test_same_seed_and_config_give_bitwise_identical_latents(finished_run, tmp_path):
    p = run_glo(*FAST, "loss=l2", "lr=0.1", "report=false", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = np.load(finished_run / "latents.npz"), np.load(tmp_path / "latents.npz")
    assert np.array_equal(a["latents"], b["latents"]) and np.array_equal(a["loss_curves"], b["loss_curves"],
                                                                         equal_nan=True)


def test_multirun_gives_each_job_its_own_directory_and_compare_ranks_them(tmp_path):
    p = run_glo("--multirun", "vae=tiny_random", "lr=0.001,0.1", "data.limit=1", "data.size=64", "max_steps=4", "report=false", "precision=fp32",
                f"hydra.sweep.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    lrs = [json.loads((tmp_path / str(k) / "metadata.json").read_text())["config"]["lr"] for k in (0, 1)]
    assert lrs == [0.001, 0.1]
    gains = [json.loads((tmp_path / str(k) / "summary.json").read_text())["psnr_gain_mean"] for k in (0, 1)]
    assert gains[1] > gains[0]  # 4 steps at lr 0.1 go further than at lr 0.001
    c = run_glo(str(tmp_path), module="glo.compare")
    assert c.returncode == 0, c.stderr
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert "lr=0.1" in table[2] and "lr=0.001" in table[3]  # sorted by gain, best first
    assert "lr=0.1" in c.stdout


def bad_folder(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "corrupt":
        Image.new("RGB", (64, 64), "red").save(folder / "good.png")
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def as_in_hydra_main(monkeypatch, out, *overrides: str) -> DictConfig:
    """glo.run's config as hydra.main hands it to the job, writing to `out`: Hydra's node set aside (the output
    directories refer to it) and removed."""
    cfg = run_config(*overrides, hydra_node=True)
    cfg.hydra.runtime.output_dir = str(out)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)  # restored after the test
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize("override,message", [
    ("lr=0", "lr=0"),
    ("lr=fast", "lr=fast: must be a finite number"),
    ("lr=inf", "lr=inf: must be a finite number"),
    ("lr=1e400", "lr=inf: must be a finite number"),
    ("eps=inf", "eps=inf: must be a finite number"),
    ("anchor=inf", "anchor=inf: must be a finite number"),
    ("channel_lr=[inf,1,1,1]", "channel_lr[0]=inf: must be a finite number"),
    ("betas=[nan,0.9]", "betas[0]=nan: must be a finite number"),
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("max_steps=2.5", "max_steps=2.5: must be an integer"),
    ("rel_tol=-1", "rel_tol=-1: must be >= 0"),
    ("precision=fp8", "precision=fp8: must be one of auto, fp32, bf16, fp16"),
    ("lr=-0.1", "lr=-0.1: must be > 0"),
    ("resume=maybe", "resume=maybe: must be one of auto, restart"),
    ("vae.path=2024", "vae.path=2024: read as a number, not a path; write the folder with a slash (vae.path=./NAME)"),
    ("batch_size=2.5", "batch_size=2.5: must be an integer"),
    ("batch_size=true", "batch_size=True: must be an integer"),
    ("data.limit=0", "data.limit=0: must be >= 1, or null"),
    ("seed=4294967296", "seed=4294967296: must be < 4294967296"),
    ("device=tpu", "device=tpu: must be one of auto, cpu, cuda, mps"),
    ("channel_lr=[1,-1]", "channel_lr[1]=-1: must be >= 0"),
    ("channel_lr=[]", "channel_lr=(): must hold at least 1, or null"),
    ("optim=lbfgs channel_lr=[1,1,1,1]", "channel_lr: optim=lbfgs takes no Adam steps"),
    ("optim=gradfree mask=boxes mask.known_only=true",
     "optim=gradfree has no pixel loss to restrict: use optim=adam with mask.known_only=true"),
])
def test_a_bad_setting_is_refused_by_validate_before_anything_is_built(override, message, capsys, monkeypatch, tmp_path):
    """In process: validate() is run()'s first call; the cases below run all of run() with nothing written."""
    with pytest.raises(SystemExit), one_line_errors("glo"):  # as glo.run's main wraps run()
        validate(as_in_hydra_main(monkeypatch, tmp_path, *override.split()))
    err = capsys.readouterr().err
    assert err.startswith("glo: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("overrides", [["data.limit=1"], ["seed=4294967295"], ["optim=gradfree", "mask=boxes"],
                                       ["mask=boxes", "mask.known_only=true"], ["device=cpu", "data.limit=null"]])
def test_validate_allows_the_edges_and_returns_the_settings_and_speed_switches(overrides, monkeypatch, tmp_path):
    settings, speed = validate(as_in_hydra_main(monkeypatch, tmp_path, *overrides, "tile_size=64"))
    assert speed == Speed(channels_last=False, checkpointing=False, tile_size=64)
    assert settings == built(Settings, run_config(*overrides))


@pytest.mark.parametrize("overrides,message", [
    (["data.size=60"], "data.size=60: must be a multiple of 8"),
    (["data=folder", "data.path=MISSING"], "no such directory"),
    (["data=folder", "data.path=EMPTY"], "no image files"),
    (["data=folder", "data.path=CORRUPT"], "broken.jpg: not a readable image"),
    (["data=folder", "data.path=CORRUPT"], "; replace or remove it, or run with data.on_error=skip to leave such files out"),
    (["data=folder"], "data.path: must be set"),
    (["mask=folder"], "mask.path: must be set (e.g. mask.path=DIR)"),
    (["vae=sd_file"], "vae.path: must be set (e.g. vae.path=FILE)"),
    (["betas=[2,3]"], "betas[0]=2: must be < 1"),
    (["betas=abc"], "betas=abc: must be a list"),
    (["num_workers=-1"], "num_workers=-1: must be >= 0"),
    (["seed=-1"], "seed=-1: must be >= 0"),
    (["data.limit=abc"], "data.limit=abc: must be an integer, or null"),
    (["data.limit=-1"], "data.limit=-1: must be >= 1, or null"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, overrides, message):
    """In process, as glo.run's main calls run(). A GloError from run() reaches the console as one line in the
    subprocess tests (test_masks' bad masks, fewer images than processes here)."""
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(bad_folder(tmp_path, "empty")),
             "CORRUPT": str(bad_folder(tmp_path, "corrupt"))}
    overrides = [o.replace(o.split("=")[1], paths.get(o.split("=")[1], o.split("=")[1])) for o in overrides]
    out = tmp_path / "run"
    cfg = as_in_hydra_main(monkeypatch, out, *overrides, "data.size=64" if "data.size=60" not in overrides else "max_steps=2")
    with pytest.raises(SystemExit), one_line_errors("glo"):
        glo.run.run(cfg)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (out / "latents.npz").exists() and not (out / "summary.json").exists()
    assert not (out / "fingerprint.json").exists() and not (out / "shards").exists()


def test_skip_mode_runs_on_and_lists_the_bad_files(tmp_path):
    folder = bad_folder(tmp_path, "corrupt")
    p = run_glo("data=folder", f"data.path={folder}", "data.on_error=skip", "data.size=64", "max_steps=2", "precision=fp32",
                "report=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert [s["source"] for s in meta["skipped"]] == [str(folder / "broken.jpg")]
    assert list(np.load(tmp_path / "run" / "latents.npz")["ids"]) == ["good"]


def test_unknown_loss_is_one_line_listing_the_choices(tmp_path):
    p = run_glo("loss=huber", f"hydra.run.dir={tmp_path}/run")
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and errors == ["glo: error: loss=huber: there is no loss huber; choose one of l1, l1_l2, l2"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_output_directory_is_one_line(tmp_path, multirun):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    where = f"hydra.sweep.dir={blocker}/sweep" if multirun else f"hydra.run.dir={blocker}/run"
    p = run_glo(*(["-m", "lr=0.1,0.2"] if multirun else []), where)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("glo: error:")]
    assert len(errors) == 1 and f"output directory {blocker}" in errors[0] and "cannot write there" in errors[0]


def test_an_added_key_that_nothing_reads_is_one_line_not_a_run_on_the_defaults(tmp_path):
    p = run_glo(*FAST, "+max_step=50", f"hydra.run.dir={tmp_path}")  # as Hydra's hint for max_step=50 says
    errors = [line for line in p.stderr.splitlines() if line.startswith("glo: error:")]
    assert p.returncode == 1 and len(errors) == 1 and "did you mean max_steps=50?" in errors[0], p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("module,override,hint", [
    ("glo.run", "max_step=50", "max_step=50: glo has no setting max_step (did you mean max_steps=50?)"),
    ("glo.bench", "repeat=3", "repeat=3: glo has no setting repeat (did you mean repeats=3?)"),
    ("glo.roundtrip", "trip=3", "trip=3: glo has no setting trip (did you mean trips=3?)"),
    ("glo.train_vae", "sed=1", "sed=1: glo has no setting sed (did you mean seed=1?)"),
    ("glo.train_vae", "max_step=9", "max_step=9: glo has no setting max_step (did you mean trainer.max_steps=9?)"),
])
def test_a_mistyped_key_is_one_line_naming_the_nearest_in_every_tool(tmp_path, module, override, hint):
    """Hydra's own message spans several lines and suggests adding the key with `+`, which would change nothing."""
    p = run_glo(override, f"hydra.run.dir={tmp_path}/run", module=module)
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(errors) == 1 and errors[0].startswith(f"glo: error: {hint}"), p.stderr[-2000:]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,line", [
    ("data.sise=256", "data.sise=256: glo has no setting data.sise (did you mean data.size=256?); the settings are"),
    ("max_stepz=3", "max_stepz=3: glo has no setting max_stepz (did you mean max_steps=3?); the settings are"),
    ("callbacks.export.fromat=x", "callbacks.export.fromat=x: glo has no setting callbacks.export.fromat (did you "
                                  "mean callbacks.export.format=x?)"),
    ("hydr=1", "hydr=1: glo has no setting hydr; the settings are the keys in conf/ and the README"),  # not Hydra's
    ("mask=boxs", "mask=boxs: there is no mask boxs; choose one of boxes, folder, none, strokes"),
    ("hydra/launcher=foo", "hydra/launcher=foo: there is no hydra/launcher foo; choose one of basic, submitit_local"),
    ("betas=[0.5", "betas=[0.5: cannot read it: no viable alternative at input '[0.5'; See https://hydra.cc/"),
    ("lr=0.1,0.2", "Ambiguous value for argument 'lr=0.1,0.2'; 1. To use it as a list, use key=[value1,value2]; 2."),
    (None, "data.sise: glo has no setting data.sise; the settings are"),  # composed inside a tool (bench's methods)
    # a key that exists one level down: size=512 was answered with tile_size=512, devices=2 with device=2
    ("size=512", "size=512: glo has no setting size (did you mean data.size=512?); the settings are"),
    ("devices=2", "devices=2: glo has no setting devices (did you mean trainer.devices=2?); the settings are"),
    ("format=hdf5", "format=hdf5: glo has no setting format (did you mean export.format=hdf5?); the settings are"),
    ("path=x data=folder mask=folder", "path=x: glo has no setting path (did you mean data.path=x, mask.path=x or "
                                       "vae.path=x?); the settings are"),
    ("path=x data=folder", "path=x: glo has no setting path (did you mean data.path=x or vae.path=x?)"),
    ('size="a=b"', 'size="a=b": glo has no setting size (did you mean data.size="a=b"?)'),  # the value as typed
    ("accelerator=gpu", "accelerator=gpu: glo has no setting accelerator; the settings"),  # ${device}: not offered
    ("target=x", "target=x: glo has no setting target; the settings"),  # data._target_ is not a setting
])
def test_hydra_errors_about_the_command_line_become_one_line(monkeypatch, override, line):
    overrides = override.split() if override else []
    monkeypatch.setattr("sys.argv", ["glo.run", *overrides])
    with pytest.raises(COMMAND_LINE_ERRORS) as e:
        run_config(*(overrides or ["data.sise=1"]), hydra_node=True)
    assert one_line(e.value).startswith(line) and "\n" not in one_line(e.value), one_line(e.value)


@pytest.mark.parametrize("args,line", [
    (["lr=0.1", "logger=null"], "logger=null: a config group cannot be null; choose one of none, tensorboard, or leave "
                                "logger out for its default"),
    (["mask=null"], "mask=null: a config group cannot be null; choose one of boxes, folder, none, strokes, or leave"),
    (["lr=null", "hydra/launcher=null", "logger=none"], None),  # not a glo group, or not null: Hydra's to judge
])
def test_a_config_group_set_to_null_is_one_line_with_its_options(monkeypatch, capsys, args, line):
    """Hydra refuses `group=null` with a ValueError's traceback."""
    monkeypatch.setattr("sys.argv", ["glo.run", *args])
    ran = []
    with pytest.raises(SystemExit) if line else contextlib.nullcontext() as e:
        hydra_main(lambda: ran.append(True))
    assert ran == ([] if line else [True]) and (not line or e.value.code == 1)
    assert capsys.readouterr().err.startswith(f"glo: error: {line}" if line else "")


def test_setting_a_key_under_a_deleted_group_is_one_line_naming_both(monkeypatch):
    monkeypatch.setattr("sys.argv", ["glo.run", "~data", "data.limit=1"])
    with pytest.raises(COMMAND_LINE_ERRORS) as e:
        run_config("~data", "data.limit=1", hydra_node=True)
    assert one_line(e.value) == ("~data data.limit=1: data was deleted, so nothing under it can be set; drop ~data or "
                                 "data.limit=1")


@pytest.mark.parametrize("args,cause", [
    (["~image_every_n_batches"], "Interpolation key 'image_every_n_batches' not found"),
    (["image_every_n_batches=2"], None),
    (["~report"], None),  # deleted, and read nowhere the error names: the error is glo's bug, not the deletion's
])
def test_deleting_a_key_the_run_reads_is_one_line_and_any_other_such_error_keeps_its_traceback(monkeypatch, capsys,
                                                                                               args, cause):
    monkeypatch.setattr("sys.argv", ["glo.run", *args])
    cfg = run_config(*args)
    with pytest.raises(SystemExit if cause else ConfigAttributeError) as e, one_line_errors("glo"):  # as in the job
        instantiate(cfg.module) if cause else cfg.module.no_such_key  # the latter: glo's bug
    assert not cause or e.value.code == 1
    err = capsys.readouterr().err
    assert err == "" if not cause else (err.count("\n") == 1 and err.startswith(
        f"glo: error: {args[0]}: the run needs what was deleted ({cause}") and err.endswith(
        "); set a value instead of deleting it\n")), err


def test_an_unset_environment_variable_in_an_override_is_one_line(tmp_path):
    p = run_glo(*FAST, "data=folder", "data.path=${oc.env:GLO_UNSET_VARIABLE}", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 1 and p.stderr.splitlines() == [
        "glo: error: data.path: cannot resolve its value (KeyError raised while resolving interpolation: "
        "\"Environment variable 'GLO_UNSET_VARIABLE' not found\"); set it or give the value"], p.stderr


@pytest.mark.parametrize("override,refused", [
    ("+foo=1", True), ("+trainer.profiler=simple", False), ("+hydra.job.env_set.A=1", False), ("lr=0.3", False),
])
def test_only_added_keys_outside_any_target_are_refused(override, refused):
    cfg = run_config(override, hydra_node=True)
    with pytest.raises(SystemExit) if refused else contextlib.nullcontext():
        NoUnreadKeys().on_run_start(cfg)
