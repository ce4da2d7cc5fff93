"""Shared fixtures: the tiny random VAE from its own config file, and scikit-image photos as tensors."""
from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from glo.app.config import built
from glo.data.images import SampleDataset
from glo.layout import COLUMNS, MASKED
from glo.method.settings import Settings
from glo.model.vae import FrozenVAE

ROOT = Path(__file__).resolve().parents[1]
# Another kernel (another batch size, thread count or CPU) sums each conv of an fp32 pass of the tiny
# VAE in another order: a few ulps per layer over its ~20 layers of [-1, 1] output. 2**10 ulps
# (1.2e-4) bounds that; a wrong latent or image moves the output by 1e-2 and more, so a test that
# uses it can still fail.
VAE_FP32_ATOL = 2**10 * torch.finfo(torch.float32).eps


def adam_fp32_tol(steps: int) -> float:
    """How far (relative, and absolute near 0) latents may part after `steps` Adam steps fed gradients that other
    kernels round otherwise: each step adds a few ulps (2**4 bounds them on every CPU and thread count);
    a state shared between samples would part them by a whole step (~lr)."""
    return steps * 2**4 * torch.finfo(torch.float32).eps


AXES = {"C": 4, "h": 8, "w": 8, "H": 64, "W": 64, "T": 5}  # the sizes of declared_rows' axes


def declared_rows(ids: list[str], seed: int = 0, masked: bool = False, **columns) -> dict:
    """Rows of every column glo.layout declares (MASKED's too with `masked`), random but of the
    declared kind and shape, with `columns` on top: what a batch of glo.run exports."""
    rng = np.random.default_rng(seed)
    n, out = len(ids), {}
    for k, c in (COLUMNS | (MASKED if masked else {})).items():
        shape = (n, *(AXES.get(a) or int(a) for a in c.shape))
        out[k] = {"U": lambda: np.array([f"{k}{i}" for i in range(n)]),
                  "f": lambda: rng.random(shape, dtype=np.float32),
                  "i": lambda: np.zeros(shape, np.int64),
                  "b": lambda: np.zeros(shape, bool)}[c.kind]()
    return {**out, "ids": np.array(ids), **columns}


@pytest.fixture(scope="session")
def tiny_vae() -> FrozenVAE:
    return instantiate(OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml"))


def compose_config(name: str, *overrides: str, hydra_node: bool = False) -> DictConfig:
    """conf/<name>.yaml composed as `python -m glo.<tool>` composes it (with `hydra_node`, Hydra's own settings too,
    as its callbacks and HydraConfig see them)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=hydra_node)


def run_config(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """conf/run.yaml, as `python -m glo.run` composes it."""
    return compose_config("run", *overrides, hydra_node=hydra_node)


@cache
def _default_settings() -> Settings:
    return built(Settings, run_config())


def settings(**changes) -> Settings:
    """The engine's settings with conf/run.yaml's defaults, fp32 pinned (auto would follow this CPU), changed."""
    return _default_settings().replace(**{"precision": "fp32", **changes})


def channel_map(z: torch.Tensor, mapped: torch.Tensor) -> torch.Tensor:
    """The (C,C) matrix A with mapped = z @ A cell by cell (latents (B,C,h,w)), by least squares."""
    cells = lambda t: t.flatten(2).transpose(1, 2).reshape(-1, t.shape[1])
    return torch.linalg.lstsq(cells(z), cells(mapped)).solution


def photos(n: int, size: int = 64) -> torch.Tensor:
    """(n,3,size,size) in [-1,1] from the photos scikit-image ships."""
    ds = SampleDataset(size=size, limit=n)
    return torch.stack([ds[i][0] for i in range(n)])


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
