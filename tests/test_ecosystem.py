"""glo in the tools its users already have: Hugging Face datasets, Optuna sweeps, SLURM launch."""
import json

import numpy as np
import pytest
import torch

from glo.latents import LatentDataset, load_latents
from glo.to_hf import main as to_hf_main
from tests.conftest import FAST, run_config, run_glo

datasets = pytest.importorskip("datasets", reason="the 'hf' extra (pip install -e '.[hf]') is not installed")


def test_hf_dataset_round_trips_bit_for_bit(finished_run, tmp_path):
    out = tmp_path / "hf"
    to_hf_main([str(finished_run), str(out)])
    ds = datasets.load_from_disk(str(out)).with_format("numpy")
    a = load_latents(finished_run / "latents.npz")
    assert set(ds.column_names) == set(a) and len(ds) == len(a["ids"])
    for k, v in a.items():
        col = np.asarray(ds[k])
        assert col.dtype == v.dtype and np.array_equal(col, v), k
    assert json.loads((out / "glo_summary.json").read_text()) == json.loads((finished_run / "summary.json").read_text())
    saved = datasets.load_from_disk(str(out)).features  # fixed row shapes: a reader can stack rows without padding
    assert saved["latents"] == datasets.Array3D(shape=a["latents"].shape[1:], dtype="float32")
    assert saved["loss_curves"].length == a["loss_curves"].shape[1]

    loader = torch.utils.data.DataLoader(datasets.load_from_disk(str(out)).with_format("torch"), batch_size=1)
    ours = LatentDataset(finished_run / "latents.npz")
    for row, item in zip(loader, ours, strict=True):
        assert row["ids"][0] == item["id"]
        assert torch.equal(row["latents"][0], item["latent"]) and torch.equal(row["initial_latents"][0], item["initial_latent"])


def test_hf_conversion_refuses_to_overwrite(finished_run, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit) as e:
        to_hf_main([str(finished_run), str(tmp_path / "hf")])
    assert e.value.code == 1 and capsys.readouterr().err.strip() == f"glo.to_hf: error: {tmp_path / 'hf'}: already exists; remove it or name another OUT"


def test_submitit_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cfg = run_config("hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                     hydra_node=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.partition == "gpu"


@pytest.mark.slow
def test_a_two_trial_optuna_sweep_finishes_with_its_best_value(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed")
    cfg = run_config("hparams_search=optuna", hydra_node=True)
    assert cfg.hydra.sweeper.direction == "maximize" and {"lr", "anderson"} <= set(cfg.hydra.sweeper.params)
    p = run_glo(*FAST, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "report=false",
                f"hydra.sweep.dir={tmp_path}", "--multirun")
    assert p.returncode == 0, p.stderr[-3000:]
    best = (tmp_path / "optimization_results.yaml").read_text()
    gains = [json.loads((tmp_path / str(i) / "summary.json").read_text())["psnr_gain_mean"] for i in range(2)]
    assert f"best_value: {max(gains)}" in best


def test_the_console_says_what_the_run_does_and_nothing_else(tmp_path):
    p = run_glo(*FAST, "report=false", f"hydra.run.dir={tmp_path}")
    assert p.returncode == 0, p.stderr[-3000:]
    console = p.stdout + p.stderr
    for noise in ("Tip:", "litlogger", "LeafSpec", "GPU available", "TPU available"):
        assert noise not in console, noise
    start = next(line for line in p.stdout.splitlines() if line.startswith("glo: VAE"))
    assert start == (f"glo: VAE tiny_random (random:0) on cpu, precision fp32 (forced by precision=fp32); "
                     f"3 of 3 images to do -> {tmp_path}")
    assert "3/3 images" in p.stderr and "images/s" in p.stderr  # the bar counts images, not batches
    assert p.stdout.splitlines()[-1].startswith("glo: 3 images, PSNR")
