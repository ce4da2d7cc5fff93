"""Shared fixtures: the tiny random VAE from its own config file, and scikit-image photos as tensors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from glo.data import SampleDataset
from glo.vae import FrozenVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_vae() -> FrozenVAE:
    return instantiate(OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml"))


def photos(n: int, size: int = 64) -> torch.Tensor:
    """(n,3,size,size) in [-1,1] from the photos scikit-image ships."""
    ds = SampleDataset(size=size, limit=n)
    return torch.stack([torch.from_numpy(ds[i][0]).permute(2, 0, 1) for i in range(n)])


def run_glo(*overrides: str, module: str = "glo.run", timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a glo entry point as a user would, offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


# fp32 pinned: the default (auto) would follow this CPU, and tests must not depend on it
FAST = ["vae=tiny_random", "data.limit=3", "data.size=64", "max_steps=8", "batch_size=2", "precision=fp32"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    """One small glo.run shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("finished") / "run"
    p = run_glo(*FAST, "loss=l2", "lr=0.1", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out
