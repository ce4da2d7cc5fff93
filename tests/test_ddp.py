"""`glo.run` with two DDP processes on CPU: every image exported once, and a stop reaches every rank."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, run_glo

DDP = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Lightning's launcher starts rank 1 as rank 0's child)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_process_ddp_exports_every_image_exactly_once(tmp_path):
    p = run_glo("vae=tiny_random", *DDP, "data.limit=5", "data.size=64", "max_steps=3", "batch_size=2",
                "report=false", "precision=fp32", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    ids = list(np.load(tmp_path / "latents.npz")["ids"])
    assert sorted(ids) == sorted(["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"])
    manifests = [json.loads(m.read_text()) for m in sorted((tmp_path / "shards").glob("manifest-*.json"))]
    assert len(manifests) == 2 and all(manifests)  # both ranks did a share of the work
    a, summary = np.load(tmp_path / "latents.npz"), json.loads((tmp_path / "summary.json").read_text())
    busiest = max(a["seconds"][a["rank"] == r].sum() for r in (0, 1))
    assert sorted(set(a["rank"])) == [0, 1] and summary["images_per_second"] == pytest.approx(5 / busiest)


def test_fewer_images_left_than_processes_is_one_line_and_one_process_finishes(tmp_path):
    common = ["vae=tiny_random", "data.limit=1", "data.size=64", "max_steps=2", "report=false", f"hydra.run.dir={tmp_path}"]
    p = run_glo(*common, *DDP)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(err) == 1 and "1 image(s) to do for 2 processes" in err[0], p.stderr[-3000:]
    assert not (tmp_path / "shards").exists()
    p = run_glo(*common, DDP[0], "trainer.devices=1", "trainer.num_nodes=1")  # what the line says to do
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(np.load(tmp_path / "latents.npz")["ids"]) == ["astronaut"]


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [0, 1], ids=["rank0", "rank1"])
def test_sigterm_to_one_rank_ends_both_in_one_line_each_and_the_run_resumes(tmp_path, signalled):
    """As a scheduler or a preemption does it. Lightning's own handler broadcasts from inside the handler, so a
    rank signalled alone would wait for ever; glo's marks the stop, and every rank stops after its batch."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    out = tmp_path / "run"
    args = ["vae=tiny_random", "data=folder", f"data.path={images}", "data.size=64", "max_steps=40", "rel_tol=0",
            "batch_size=1", "report=false", "precision=fp32", "logger=none", *DDP, f"hydra.run.dir={out}"]
    proc = subprocess.Popen([sys.executable, "-m", "glo.run", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    manifests = [out / "shards" / f"manifest-{rank}.json" for rank in (0, 1)]
    deadline = time.time() + 300
    while not all(m.exists() for m in manifests) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    rank1 = children(proc.pid)
    assert proc.poll() is None and len(rank1) == 1, "the run ended before both ranks worked"
    os.kill(rank1[0] if signalled else proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    deadline = time.time() + 60
    while running(rank1[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not running(rank1[0]), "rank 1 is still running"
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("glo: error:")]
    assert len(lines) == 2 and all("stopped by SIGTERM" in ln and "run the same command again" in ln for ln in lines)
    assert sum("to another rank" in ln for ln in lines) == 1, lines
    done = {i for m in manifests for ids in json.loads(m.read_text()).values() for i in ids}
    assert 2 <= len(done) < 24 and not (out / "latents.npz").exists()

    p = run_glo(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    ids = list(np.load(out / "latents.npz")["ids"])
    assert sorted(ids) == [f"{i:02d}" for i in range(24)]  # every image exactly once
