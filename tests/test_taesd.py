"""TAESD-family autoencoders (diffusers AutoencoderTiny): the shipped real models, TAESD's original files by path,
diffusers directories, and the one-line refusals of wrong weights."""
import re
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from omegaconf import OmegaConf
from safetensors.torch import save_file

from glo import GloError
from glo.method.metrics import psnr
from glo.model.vae import FrozenVAE, load_vae
from glo.store.rundir import weights_sha256
from tests.conftest import ROOT, VAE_FP32_ATOL, photos, run_glo


def from_yaml(name: str, **changes) -> FrozenVAE:
    """load_vae with conf/vae/<name>.yaml's arguments, errors unwrapped (Hydra wraps them)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/vae/{name}.yaml"))
    return load_vae(**{k: v for k, v in cfg.items() if not k.startswith("_")}, **changes)


def random_tiny(channels: int, seed: int = 0) -> AutoencoderTiny:
    """TAESD's architecture with random weights (full width: what the original files hold)."""
    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=channels).eval()


def save_original(model: AutoencoderTiny, folder, name: str, ext: str = "safetensors", dtype=torch.bfloat16):
    """The model in TAESD's original layout: nn.Sequential keys, the decoder's shifted by its tanh clamp at 0."""
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    parts = {"encoder": {k[len("encoder.layers."):]: v for k, v in state.items() if k.startswith("encoder.")},
             "decoder": {}}
    for k, v in state.items():
        if k.startswith("decoder."):
            layer, rest = k[len("decoder.layers."):].split(".", 1)
            parts["decoder"][f"{int(layer) + 1}.{rest}"] = v
    for part, tensors in parts.items():
        tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
        path = folder / f"{name}_{part}.{ext}"
        save_file(tensors, path) if ext == "safetensors" else torch.save(tensors, path)
    return folder


@pytest.mark.parametrize("channels,ext", [(4, "safetensors"), (16, "pth"), (32, "safetensors")])
def test_original_files_load_as_the_diffusers_model_they_came_from(tmp_path, channels, ext):
    """The key mapping, read back: the original decoder's layer N is diffusers' N - 1; the channel count comes
    from the weights. fp32 weights, so the two models compute the same thing to the bit on the same kernel."""
    model = random_tiny(channels)
    folder = save_original(model, tmp_path / "models", "taemine", ext, dtype=torch.float32)
    vae = load_vae("whatever", path=str(folder))
    assert vae.latent_channels == channels and not vae.has_posterior
    x = photos(2, size=64)
    with torch.no_grad():
        z = model.encode(x).latents
        assert torch.equal(vae.encode(x), z) and z.shape == (2, channels, 8, 8)
        assert torch.equal(vae.decode(z), model.decode(z).sample)
    mean, std = vae.posterior(x)
    assert std is None and torch.equal(mean, z)


def test_the_shipped_real_models_reconstruct_photos_and_carry_their_license():
    """TAESD and TAEF1 as their author trained them: a random AutoencoderTiny reconstructs a photo at ~5 dB, the
    real ones at over 18 dB; each folder holds its license and a model card naming where the weights come from."""
    x = photos(2, size=128)
    for name, channels in (("taesd", 4), ("taef1", 16)):
        vae = from_yaml(name)
        assert vae.latent_channels == channels and vae.scaling_factor == 1.0 and vae.shift_factor == 0.0
        with torch.no_grad():
            assert psnr(vae.decode(vae.encode(x)), x).min() > 18
        folder = ROOT / "glo/pretrained" / name
        assert "MIT License" in (folder / "LICENSE").read_text()
        card = (folder / "README.md").read_text()
        assert "madebyollin/taesd" in card and "not** that VAE's own" in card
    with torch.no_grad():
        assert psnr(FrozenVAE(random_tiny(4), "r", "r").decode(FrozenVAE(random_tiny(4), "r", "r").encode(x)),
                    x).max() < 12


def test_a_save_pretrained_autoencoder_tiny_directory_loads_as_its_class(tmp_path):
    model = random_tiny(16)
    model.save_pretrained(tmp_path / "taef1")
    vae = load_vae("taef1", path=str(tmp_path / "taef1"), latent_channels=16)
    assert isinstance(vae.model, AutoencoderTiny) and vae.info()["class"] == "AutoencoderTiny"
    x = photos(1, size=64)
    with torch.no_grad():
        assert torch.allclose(vae.decode(vae.encode(x)), model.decode(model.encode(x).latents).sample,
                              atol=VAE_FP32_ATOL)


def test_one_file_of_a_pair_loads_the_pair_and_several_pairs_need_a_name(tmp_path):
    folder = tmp_path / "vae_approx"
    save_original(random_tiny(4, seed=1), folder, "taesd")
    save_original(random_tiny(16, seed=2), folder, "taef1")
    assert load_vae("taef1", path=str(folder)).latent_channels == 16
    assert load_vae("taesd", path=str(folder)).latent_channels == 4
    assert load_vae("standin", path=str(folder / "taef1_decoder.safetensors")).latent_channels == 16
    with pytest.raises(GloError, match=r"^vae.path=.*: holds 2 encoder/decoder pairs \(taef1, taesd\); pick one "
                                       r"with vae.name=taef1$"):
        load_vae("standin", path=str(folder))
    # the fingerprint digests the pair that loads, not the folder: another pair beside it changes nothing
    before = weights_sha256(folder, "taesd")
    save_original(random_tiny(4, seed=3), folder, "taesdxl")
    assert weights_sha256(folder, "taesd") == before != weights_sha256(folder, "taef1")
    assert weights_sha256(folder / "taesd_encoder.safetensors") == before


def test_wrong_original_files_are_one_line_each(tmp_path):
    good = save_original(random_tiny(4), tmp_path / "good", "taesd")
    other = save_original(random_tiny(16), tmp_path / "other", "taef1")

    def folder_with(name: str, encoder, decoder):
        f = tmp_path / name
        f.mkdir()
        shutil.copy(encoder, f / "m_encoder.safetensors")
        shutil.copy(decoder, f / "m_decoder.safetensors")
        return str(f)

    cases = [
        (folder_with("swapped", good / "taesd_decoder.safetensors", good / "taesd_encoder.safetensors"),
         r"m_encoder.safetensors: holds no TAESD encoder \(its keys are a decoder's\)"),
        (folder_with("mismatched", good / "taesd_encoder.safetensors", other / "taef1_decoder.safetensors"),
         r"m_encoder.safetensors makes 4-channel latents but m_decoder.safetensors reads 16: not one model's pair"),
    ]
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(good / "taesd_encoder.safetensors", lonely)
    cases.append((str(lonely), r"taesd_encoder.safetensors has no taesd_decoder.safetensors \(or .pth\) beside it"))
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "taesd_decoder.safetensors").write_bytes(b"not weights")
    cases.append((str(broken), r"taesd_decoder.safetensors: not a readable weights file"))
    diffusers_keys = tmp_path / "diffusers_keys"
    diffusers_keys.mkdir()
    save_file({k: v.contiguous() for k, v in random_tiny(4).state_dict().items() if k.startswith("encoder")},
              diffusers_keys / "taesd_encoder.safetensors")
    shutil.copy(good / "taesd_decoder.safetensors", diffusers_keys)
    cases.append((str(diffusers_keys), r"not TAESD's original layout \(keys such as 'encoder.layers.0."))
    cases.append((str(tmp_path / "empty_dir_missing"), "no such directory"))
    for path, message in cases:
        with pytest.raises(GloError, match=message) as e:
            load_vae("m", path=path)
        assert "\n" not in str(e.value)
    with pytest.raises(GloError, match=r"^vae 'taef1': .* holds 4-channel latents, but vae.latent_channels=16; "):
        load_vae("taef1", path=str(good), latent_channels=16)
    for bad in ("abc", 0, 2.5, True):  # refused before any weights are read
        with pytest.raises(GloError, match=r"^vae.latent_channels=.*: must be null or a whole number >= 1, e.g. 4$"):
            load_vae("taesd", path=str(tmp_path / "no such folder"), latent_channels=bad)


def test_a_deterministic_encoder_refuses_what_needs_a_posterior_or_a_quant_conv(tmp_path):
    p = run_glo("vae=taesd_random", "data.limit=1", "data.size=64", "anchor=0.1", "anchor_to=posterior",
                f"hydra.run.dir={tmp_path}/run")
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "glo: error: anchor_to=posterior: vae 'taesd_random' has a deterministic encoder (no posterior); use "
        "anchor_to=z0")
    with pytest.raises(GloError, match="rotation_seed needs an AutoencoderKL"):
        from_yaml("taesd_random", rotation_seed=0)


def test_hub_only_tiny_models_name_their_repository_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("taesdxl", "taesd3"):
        with pytest.raises(GloError, match=rf"cannot load VAE '{name}' \(madebyollin/{name}\): not in the Hugging "
                                           r"Face cache .* or pass vae.path=DIR"):
            from_yaml(name)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_shift_factor_is_subtracted_on_encode_and_added_back_on_decode(sign):
    """SD3's and FLUX.1's VAEs: latents = (mean - shift) * scaling, decode(z / scaling + shift). A sign flipped in
    either shifts every latent by 2 * shift."""
    torch.manual_seed(0)
    config = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml").config)
    model = AutoencoderKL(**{**config, "latent_channels": 16, "shift_factor": 0.3 * sign, "scaling_factor": 1.5})
    vae = FrozenVAE(model, "shifted", "random")
    x = photos(1, size=64)
    with torch.no_grad():
        mean = model.encode(x).latent_dist.mean
        z = vae.encode(x)
        assert torch.allclose(z, (mean - 0.3 * sign) * 1.5, atol=1e-6)
        assert torch.allclose(vae.decode(z), model.decode(mean).sample, atol=VAE_FP32_ATOL)


def test_the_default_model_is_the_real_sd_latent_one():
    from tests.conftest import run_config

    cfg = run_config()
    assert cfg.vae.name == "taesd" and cfg.vae.asset == "taesd" and cfg.vae.latent_channels == 4
    assert re.search(r"^  - vae: taesd", (ROOT / "conf/bench.yaml").read_text(), re.M)


@pytest.mark.slow
@pytest.mark.parametrize("vae,channels", [("tiny_random", 32), ("taesd_random", 16)])
def test_any_latent_channel_count_runs_from_glo_run_to_the_readers(tmp_path, vae, channels):
    """SD3/FLUX.1 (16) and FLUX.2 (32) channels through glo.run, glo.evaluate, glo.to_hf and LatentDataset, with
    AutoencoderKL and AutoencoderTiny: every latent column C channels, the spread a CxC figure, a gain."""
    import datasets
    import numpy as np

    from glo.latents import LatentDataset

    run = tmp_path / "run"
    p = run_glo(f"vae={vae}", f"vae.config.latent_channels={channels}", "data.limit=2", "data.size=64",
                "max_steps=4", "precision=fp32", "mask=boxes", "export.format=hdf5", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["psnr_gain_mean"] > 0 and summary["images_improved"] >= 1
    assert len(summary["channel_std_final"]) == channels and np.isfinite(summary["spread_ratio_max"])
    assert run_glo(str(run), module="glo.evaluate").returncode == 0 and "any direction of channel space" in (run / "report.md").read_text()
    assert run_glo(str(run), module="glo.to_hf").returncode == 0
    hf = datasets.load_from_disk(str(run / "hf"))
    assert np.asarray(hf[0]["latents"]).shape == (channels, 8, 8)
    item = LatentDataset(run / "latents.h5", inpainting=True)[0]
    assert item["latent"].shape == item["masked_latent"].shape == item["initial_masked_latent"].shape == (channels, 8, 8)
    # what an inpainting UNet reads: noisy latent, mask, masked latent
    assert torch.cat([item["latent"], item["mask"], item["masked_latent"]]).shape[0] == 2 * channels + 1
