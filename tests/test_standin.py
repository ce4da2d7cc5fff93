"""The stand-in VAE shipped in glo/standin: loads offline, has the SD latent interface, and is worth optimizing."""
import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from glo.method.engine import optimize
from glo.method.losses import PixelLoss
from glo.method.metrics import psnr
from glo.standin import ASSETS
from tests.conftest import ROOT, photos, run_config, settings

CARD = ASSETS / "standin_vae" / "README.md"


@pytest.fixture(scope="module")
def standin():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # shipped weights never touch the network
        yield instantiate(OmegaConf.load(ROOT / "conf/vae/standin.yaml"))


def card_figure(pattern: str) -> float:
    return float(re.search(pattern, CARD.read_text()).group(1).replace(",", ""))


def test_standin_has_the_sd_latent_interface(standin):
    x = photos(2, size=256)
    z = standin.encode(x)
    assert z.shape == (2, 4, 32, 32) and standin.decode(z).shape == x.shape
    assert standin.model.config.latent_channels == 4 and len(standin.model.config.block_out_channels) == 4
    assert 0.5 < float(z.std()) < 2.0  # the scaling factor brings latents to about unit variance, as in SD


def test_model_card_states_the_real_parameter_count(standin):
    assert card_figure(r"Parameters: ([\d,]+)") == sum(p.numel() for p in standin.parameters())


def test_reconstruction_and_optimization_on_a_photo(standin):
    x = photos(1, size=256)
    z0 = standin.encode(x)
    with torch.no_grad():
        before = float(psnr(standin.decode(z0), x))
    assert before > card_figure(r"astronaut reconstruction: ([\d.]+) dB") - 0.5
    r = optimize(standin.decode, z0, x, PixelLoss("l2", l1=0.0, l2=1.0), settings(lr=0.1, max_steps=20, rel_tol=0.0, window=5))
    with torch.no_grad():
        after = float(psnr(standin.decode(r.latents), x))
    assert after - before > 0.5


OFFLINE_VAES = ["standin", "standin_rotated", "standin_half", "family_all4", "family_kl1e4"]


@pytest.mark.parametrize("name", OFFLINE_VAES)
def test_every_shipped_or_derived_vae_loads_offline_with_the_scaling_factor_its_card_states(monkeypatch, name):
    """Each VAE the defaults are chosen on: its weights ship (or derive from weights that ship), and the scaling
    factor it loads with is its model card's (times latent_scale for a derived one)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = run_config(f"vae={name}").vae
    vae = instantiate(cfg)
    card = (ASSETS / cfg.asset / "README.md").read_text()
    stated = float(re.search(r"`scaling_factor` ([0-9.]+)", card).group(1))
    assert vae.scaling_factor == pytest.approx(stated * cfg.get("latent_scale", 1.0), rel=1e-6)
    assert vae.encode(photos(1)).shape == (1, 4, 8, 8)


def test_the_vaes_offline_are_those_the_configs_ship():
    """A new asset-backed vae config without a card (or a test) fails here."""
    shipped = sorted(p.stem for p in (ROOT / "conf/vae").glob("*.yaml")
                     if OmegaConf.load(p).get("asset") or "standin" in OmegaConf.load(p).get("defaults", []))
    assert shipped == sorted(OFFLINE_VAES + ["taef1", "taesd"])  # the real ones: tests/test_taesd.py
