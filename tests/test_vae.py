"""Loading real diffusers VAE directories offline, and the one-line errors when weights are missing."""
import logging
import re

import pytest
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate
from omegaconf import OmegaConf

import glo.vae
from glo import GloError
from glo.vae import load_vae, pick_device
from tests.conftest import ROOT, photos, run_glo


def test_encode_decode_shapes_and_scaling(tiny_vae):
    x = photos(2, size=64)
    z = tiny_vae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    raw = tiny_vae.model.encode(x).latent_dist.mean
    assert torch.allclose(z, raw * 0.18215)
    assert tiny_vae.decode(z).shape == x.shape
    assert not any(p.requires_grad for p in tiny_vae.parameters())


def test_tiny_random_is_the_same_every_time():
    cfg = OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml")
    a, b = instantiate(cfg), instantiate(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("layout", ["vae_dir", "pipeline_dir"])
def test_vae_path_loads_a_save_pretrained_directory(tmp_path, tiny_vae, layout):
    target = tmp_path / "vae" if layout == "pipeline_dir" else tmp_path
    tiny_vae.model.save_pretrained(target)
    cfg = OmegaConf.load(ROOT / "conf/vae/sd15.yaml")
    vae = instantiate(cfg, path=str(tmp_path))
    assert vae.name == "sd15" and vae.source == str(tmp_path.resolve())
    x = photos(1, size=64)
    assert torch.allclose(vae.decode(vae.encode(x)), tiny_vae.decode(tiny_vae.encode(x)))


@pytest.mark.slow
def test_sd_architecture_directory_runs_end_to_end(tmp_path):
    """The real loading path with the full SD v1 VAE config (random weights): glo.run vae=sd15 vae.path=DIR."""
    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215,
    ).save_pretrained(tmp_path / "sd15" / "vae")
    out = tmp_path / "run"
    p = run_glo("vae=sd15", f"vae.path={tmp_path / 'sd15'}", "data.size=64", "data.limit=1", "max_steps=2", "precision=fp32",
                f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert '"scaling_factor": 0.18215' in (out / "metadata.json").read_text()


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(GloError, match="no such directory"):
        load_vae("sd15", path=str(tmp_path / "nope"))
    with pytest.raises(GloError, match="no config.json"):
        load_vae("sd15", path=str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(GloError, match=r"broken: not a loadable AutoencoderKL directory \(.*config\.json.*\)$"):
        load_vae("sd15", path=str(tmp_path / "broken"))
    (tmp_path / "vae.safetensors").write_bytes(b"")
    with pytest.raises(GloError, match=r"vae\.safetensors: a single weights file; .*from_single_file\(FILE\)"):
        load_vae("sd15", path=str(tmp_path / "vae.safetensors"))


def test_offline_hub_model_says_how_to_fix_it(tmp_path):
    p = run_glo("vae=sd_vae_ft_mse", f"hydra.run.dir={tmp_path}", "data.limit=1")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "stabilityai/sd-vae-ft-mse" in lines[0] and "vae.path=" in lines[0]
    assert not (tmp_path / "latents.npz").exists()


def test_an_uncached_hub_model_says_why_it_waits_then_how_to_fix_it(monkeypatch, caplog):
    """Unreachable, the hub retries for tens of seconds (23 s here) before the one-line error."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    tried = []

    def unreachable(source, **kwargs):
        tried.append(kwargs.get("local_files_only", False))
        raise OSError("unreachable")

    monkeypatch.setattr(glo.vae, "_pretrained", unreachable)
    with caplog.at_level(logging.INFO, logger="glo"), pytest.raises(GloError, match="not in the Hugging Face cache and"):
        load_vae("sd15", pretrained="runwayml/stable-diffusion-v1-5", subfolder="vae")
    assert tried == [True, False]  # the cache, then the hub
    assert caplog.messages == ["runwayml/stable-diffusion-v1-5 is not in the Hugging Face cache: downloading it "
                               "(HF_HUB_OFFLINE=1 fails at once when offline)"]


@pytest.mark.parametrize("name,fix", [("cuda", "use device=auto or device=cpu, or install torch's CUDA build into .venv"),
                                      ("mps", "use device=auto or device=cpu")])
def test_a_device_this_machine_lacks_is_one_line_and_auto_falls_back(monkeypatch, name, fix):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only build, wherever the test runs
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(GloError, match=f"^device={name}: .*{fix}$"):
        pick_device(name)
    assert pick_device("auto") == pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")  # Apple's GPU next
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda") == pick_device("auto") == torch.device("cuda")  # auto prefers the GPU


@pytest.mark.parametrize("cuda,why,fix", [
    (None, "is a CPU-only build", "install torch's CUDA build into .venv"),
    ("12.1", "is built for CUDA 12.1, but no GPU is visible", "check the driver and CUDA_VISIBLE_DEVICES"),
])
def test_missing_cuda_says_whether_torch_lacks_it_or_the_machine_does(monkeypatch, cuda, why, fix):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    with pytest.raises(GloError, match=f"^device=cuda: torch {re.escape(torch.__version__)} {why}; "
                                       f"use device=auto or device=cpu, or {re.escape(fix)}$"):
        pick_device("cuda")
