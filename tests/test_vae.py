"""Loading real diffusers VAE directories offline, and the one-line errors when weights are missing."""
import json
import logging
import re

import diffusers.configuration_utils
import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub.errors import RepositoryNotFoundError
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

import glo.model.vae
from glo import GloError
from glo.model.hardware import pick_device
from glo.model.vae import load_vae
from tests.conftest import ROOT, VAE_FP32_ATOL, channel_map, photos, run_glo


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
@pytest.mark.parametrize("vae,layout", [("sd15", "pipeline_dir"), ("sd_file", "original_file")])
def test_sd_architecture_weights_run_end_to_end(tmp_path, vae, layout):
    """The real loading paths with the full SD v1 VAE config (random weights): glo.run vae=sd15 vae.path=DIR, and
    vae=sd_file vae.path=FILE with the file in SD's original layout, as its releases ship VAEs."""
    torch.manual_seed(0)
    model = AutoencoderKL(**OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vae/sd_file.yaml").config))
    where = tmp_path / "sd15"
    if layout == "pipeline_dir":
        model.save_pretrained(where / "vae")
    else:
        where = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
        save_file(original_layout(model.state_dict(), 2), where)
    out = tmp_path / "run"
    p = run_glo(f"vae={vae}", f"vae.path={where}", "data.size=64", "data.limit=1", "max_steps=2", "precision=fp32",
                f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-2000:]
    vae_info = json.loads((out / "metadata.json").read_text())["vae"]
    assert vae_info == {"name": vae, "source": str(where), "class": "AutoencoderKL", "latent_channels": 4,
                        "scaling_factor": 0.18215, "shift_factor": 0.0}


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(GloError, match="no such directory"):
        load_vae("sd15", path=str(tmp_path / "nope"))
    with pytest.raises(GloError, match="no config.json"):
        load_vae("sd15", path=str(tmp_path))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(GloError, match=r"broken: not a loadable autoencoder directory \(.*config\.json.*\)$"):
        load_vae("sd15", path=str(tmp_path / "broken"))
    (tmp_path / "vae.safetensors").write_bytes(b"")
    with pytest.raises(GloError, match=r"vae\.safetensors: a single weights file holds no architecture; run with "
                                       r"vae=sd_file vae\.path=.*vae\.safetensors \(the SD VAE's; SDXL's"):
        load_vae("sd15", path=str(tmp_path / "vae.safetensors"))


def original_layout(state: dict[str, torch.Tensor], resnets: int) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL names -> the original LDM ones (first_stage_model.*), as SD's own releases hold them
    (the inverse of diffusers' conversion script; its attention weights are 1x1 convolutions)."""
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0."),
             *[(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]]
    for i in range(4):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(resnets)]
        pairs += [(f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(resnets + 1)]
        pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")] if i < 3 else []
    attention = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in state.items():
        for ldm, hf in pairs + (attention if "attentions" in key else []):
            key = key.replace(hf, ldm)
        out[f"first_stage_model.{key}"] = value[..., None, None] if "attn_1" in key and value.ndim == 2 else value
    return out


TINY = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml").config)


@pytest.mark.parametrize("layout", ["original", "diffusers", "whole_sd_ckpt"])
def test_a_single_weights_file_loads_offline_into_vae_config(tmp_path, tiny_vae, layout):
    """SD's releases ship VAEs as one file in the original layout, and whole checkpoints hold one beside the UNet
    and text encoder; a file of diffusers' names loads as well."""
    state = {k: v.clone() for k, v in tiny_vae.model.state_dict().items()}
    file = tmp_path / ("sd.ckpt" if layout == "whole_sd_ckpt" else "vae.safetensors")
    original = original_layout(state, TINY["layers_per_block"])
    if layout == "whole_sd_ckpt":
        others = {"model.diffusion_model.out.2.bias": torch.ones(4), "cond_stage_model.transformer.w": torch.ones(2)}
        torch.save({"state_dict": {**original, **others}, "global_step": 470000}, file)
    else:
        save_file(original if layout == "original" else state, file)
    vae = load_vae("sd_file", path=str(file), config=TINY)
    assert vae.source == str(file.resolve())
    assert all(torch.equal(v, state[k]) for k, v in vae.model.state_dict().items())


def test_a_weights_file_missing_a_weight_or_of_another_architecture_is_refused_in_one_line(tmp_path, tiny_vae):
    """diffusers' from_single_file leaves a weight the file lacks at random, silently."""
    state = original_layout(tiny_vae.model.state_dict(), TINY["layers_per_block"])
    save_file({k: v for k, v in state.items() if k != "first_stage_model.decoder.conv_out.bias"}, tmp_path / "a.safetensors")
    with pytest.raises(GloError, match=r"a\.safetensors: 1 of the VAE's 180 weights are not in the file \(e\.g\. "
                                       r"decoder\.conv_out\.bias\); it holds no SD VAE, or not one of vae\.config's"):
        load_vae("sd_file", path=str(tmp_path / "a.safetensors"), config=TINY)
    save_file(state, tmp_path / "c.safetensors")
    with pytest.raises(GloError, match=r"c\.safetensors: not vae\.config's architecture \(size mismatch for "
                                       r"encoder\.conv_out\.weight: .*\)$"):
        load_vae("sd_file", path=str(tmp_path / "c.safetensors"), config={**TINY, "latent_channels": 8})
    (tmp_path / "b.safetensors").write_bytes(b"not weights")
    with pytest.raises(GloError, match=r"b\.safetensors: not a readable weights file \(.*deserializing header.*\)$"):
        load_vae("sd_file", path=str(tmp_path / "b.safetensors"), config=TINY)


@pytest.mark.parametrize("name,repo,offline", [
    ("sd14", "CompVis/stable-diffusion-v1-4", "1"), ("sdxl", "stabilityai/sdxl-vae", "TRUE"),
    ("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "yes"), ("sd_vae_ft_mse", "stabilityai/sd-vae-ft-mse", "on"),
])
def test_each_hub_vae_names_its_repository_at_once_when_offline(monkeypatch, caplog, name, repo, offline):
    """Each of huggingface_hub's spellings of HF_HUB_OFFLINE fails at once, without trying the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with caplog.at_level(logging.INFO, logger="glo"), \
            pytest.raises(GloError, match=f"^cannot load VAE '{name}' \\({repo}\\): not in the Hugging Face cache"):
        load_vae(**{k: v for k, v in OmegaConf.load(ROOT / f"conf/vae/{name}.yaml").items() if k != "_target_"})
    assert caplog.messages == []  # no "downloading it"


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

    def unreachable(source, subfolder, local_files_only=False):
        tried.append((source, subfolder, local_files_only))
        raise OSError("unreachable")

    monkeypatch.setattr(glo.model.vae, "_pretrained", unreachable)
    with caplog.at_level(logging.INFO, logger="glo"), pytest.raises(GloError, match="not in the Hugging Face cache and"):
        load_vae("sd15", pretrained="stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="vae")
    assert tried == [("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae", True),  # the cache, then the hub
                     ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae", False)]
    assert caplog.messages == ["stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the Hugging Face cache: "
                               "downloading it (HF_HUB_OFFLINE=1 fails at once when offline)"]


def test_a_repository_the_hub_does_not_have_is_named_as_such_not_as_unreachable(monkeypatch):
    """runwayml/stable-diffusion-v1-5 left the hub in 2024: "unreachable" would send its users to their network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from httpx2 import Request, Response  # huggingface_hub's HTTP client

    def gone(*args, **kwargs):  # what the hub's client raises on a 404 for the repository
        raise RepositoryNotFoundError("404", response=Response(404, request=Request("GET", "https://huggingface.co")))

    monkeypatch.setattr(diffusers.configuration_utils, "hf_hub_download", gone)
    with pytest.raises(GloError, match=r"^cannot load VAE 'sd15': the Hugging Face hub has no repository "
                                       r"runwayml/stable-diffusion-v1-5 you may read \(removed, renamed, or gated"):
        load_vae("sd15", pretrained="runwayml/stable-diffusion-v1-5", subfolder="vae")


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


def test_a_vae_in_rotated_or_rescaled_latent_coordinates_decodes_what_the_original_decodes(tiny_vae):
    """The derivation is right: the rotated VAE's latents are an orthogonal map of the original's, the rescaled
    one's a multiple, and both decode to the original's images (within one fp32 pass of rounding)."""
    x = photos(2)
    cfg = OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml")
    rotated = instantiate(cfg, rotation_seed=0)
    half = instantiate(cfg, latent_scale=0.5)
    z, zr, zh = tiny_vae.encode(x), rotated.encode(x), half.encode(x)
    with torch.no_grad():
        reference = tiny_vae.decode(z)
        assert torch.allclose(rotated.decode(zr), reference, atol=VAE_FP32_ATOL)
        assert torch.allclose(half.decode(zh), reference, atol=VAE_FP32_ATOL)
    assert (zr - z).abs().max() > 0.1  # other coordinates ...
    rot = channel_map(z, zr)
    assert torch.allclose(rot.T @ rot, torch.eye(4), atol=1e-4)  # ... by an orthogonal map
    assert torch.equal(zh, 0.5 * z) and half.scaling_factor == 0.5 * tiny_vae.scaling_factor
    with pytest.raises(GloError, match="latent_scale=0: must be a number > 0"):
        load_vae("tiny", config=OmegaConf.to_container(cfg.config), latent_scale=0)
