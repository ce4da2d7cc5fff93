"""glo.inpaint and glo.train_inpaint: diffusers' inpainting pipeline fed glo's latents, scored on its output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, photos, run_glo
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from omegaconf import OmegaConf

from glo import GloError
from glo.inpaint import positional_run_dir, scores, start_noise
from glo.latents import load_latents
from glo.method.metrics import region_psnr, region_ssim, seam_band
from glo.model.inpainter import Inpainter, load_inpainter
from glo.model.vae import load_vae
from glo.train.inpaint import held_out_loss, split

TRAIN = OmegaConf.load(ROOT / "conf/train_inpaint.yaml")


def random_unet(in_channels: int, seed: int = 0, latent_channels: int = 4) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**OmegaConf.to_container(TRAIN.unet), "in_channels": in_channels,
                                   "out_channels": latent_channels, "sample_size": 8}).eval()


def random_inpainter(in_channels: int, latent_channels: int = 4) -> Inpainter:
    unet = random_unet(in_channels, latent_channels=latent_channels)
    return Inpainter("random", "random", unet, DDIMScheduler(**OmegaConf.to_container(TRAIN.scheduler)),
                     torch.zeros(1, 1, unet.config.cross_attention_dim))


def save_inpainter(path: Path, in_channels: int) -> Path:
    random_unet(in_channels).save_pretrained(path / "unet")
    DDPMScheduler(**OmegaConf.to_container(TRAIN.scheduler)).save_pretrained(path / "scheduler")
    return path


def conditioning(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    z, zm, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:5, 3:7] = 1
    mask[1, :, 5:, :3] = 1
    return z, zm, mask, noise


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("masked") / "run"
    p = run_glo(*FAST, "mask=boxes", "report=false", "logger=none", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_the_9_channel_unet_reads_the_exported_masked_latents_and_mask_unchanged(tiny_vae):
    inpainter = random_inpainter(9)
    z, zm, mask, noise = conditioning()
    seen = []
    hook = inpainter.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        inpainter(tiny_vae, z, zm, mask, noise, steps=3)
    finally:
        hook.remove()
    assert len(seen) == 3
    for x in seen:  # cat([noisy latents, mask, masked_image_latents]) at every step
        assert torch.equal(x[:, 4:5], mask) and torch.equal(x[:, 5:], zm)
    assert torch.equal(seen[0][:, :4], noise * inpainter.scheduler.init_noise_sigma)  # the start noise we gave


def test_the_blend_pipeline_keeps_the_exported_latents_outside_the_hole_exactly(tiny_vae):
    z, zm, mask, noise = conditioning()
    out = random_inpainter(4)(tiny_vae, z, zm, mask, noise, steps=3)
    known = mask == 0
    assert torch.equal(out.expand_as(z)[known.expand_as(z)], z[known.expand_as(z)])
    assert (out - z).abs()[~known.expand_as(z)].min() > 0  # the hole is the UNet's, not the latents'


def test_a_unet_refuses_latents_of_another_channel_count_and_the_pipeline_any_but_4(tiny_vae, tmp_path):
    """The kind follows the latent channels C (blend: C in, sd_inpaint: 2C+1); diffusers' SD inpainting pipeline
    reads only 4-channel latents, so a 16-channel run is refused in one line rather than inpainted wrongly."""
    assert random_inpainter(33, latent_channels=16).kind == "sd_inpaint"
    assert random_inpainter(16, latent_channels=16).kind == "blend"
    with pytest.raises(GloError, match=r"^inpainter 'random' \(random\) denoises 16-channel latents, but the run's "
                                       r"vae 'tiny_random' makes 4-channel ones"):
        random_inpainter(33, latent_channels=16).check(tiny_vae)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/vae/tiny_random.yaml"))
    wide = load_vae("wide", config={**cfg["config"], "latent_channels": 16})
    with pytest.raises(GloError, match=r"vae 'wide' makes 16-channel latents, and diffusers' "
                                       r"StableDiffusionInpaintPipeline runs only Stable Diffusion's 4-channel ones"):
        random_inpainter(33, latent_channels=16).check(wide)
    with pytest.raises(GloError, match=r"a UNet with 10 input channels for 4-channel latents; glo.inpaint runs 4 "
                                       r"\(blend\) or 9 \(sd_inpaint\)"):
        load_inpainter("odd", path=str(save_inpainter(tmp_path / "odd", 10)))


def test_a_shipped_unet_refuses_the_latents_of_a_vae_it_was_not_trained_on(tiny_vae):
    """The same channel count is not the same latent space: glo.train_inpaint records the VAE (glo.json)."""
    model = load_inpainter("blend", asset="inpaint_blend")
    assert model.trained_on == "standin"
    model.check(load_vae("standin", asset="standin_vae"))
    with pytest.raises(GloError, match=r"^inpainter 'blend' \(glo/standin/inpaint_blend\) was trained on vae "
                                       r"'standin' latents, and the run's are vae 'tiny_random''s; choose"):
        model.check(tiny_vae)


def test_the_same_seed_gives_the_same_output_and_another_seed_another():
    ids = ["a", "b"]
    first, again = start_noise(ids, 0, (4, 8, 8)), start_noise(ids[::-1], 0, (4, 8, 8))
    assert torch.equal(first, again.flip(0))  # each image's noise depends on its id, not on its batch
    assert not torch.equal(first, start_noise(ids, 1, (4, 8, 8)))
    assert not torch.equal(first[0], first[1])


def test_region_scores_are_those_of_hand_made_arrays(tiny_vae):
    target = torch.zeros(1, 3, 32, 32)
    hole = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    hole[..., 8:16, 8:16] = True
    pred = target.clone()
    pred[..., 8:16, 8:16] = 1.0  # the hole is wrong by half the [0,1] range: 10 log10(1 / 0.25)
    pred[..., 20:, 20:] = 0.02  # the known region far from the seam: mse 0.01^2 over 144 of 960 known pixels
    assert region_psnr(pred, target, hole).item() == pytest.approx(10 * np.log10(4), abs=1e-4)
    known_mse = 0.01**2 * 144 / (32 * 32 - 64)
    assert region_psnr(pred, target, ~hole).item() == pytest.approx(-10 * np.log10(known_mse), abs=1e-3)
    band = seam_band(hole, 2)
    assert band.sum() == 12 * 12 - 64 and not (band & hole).any() and band[0, 0, 6, 6] and not band[0, 0, 5, 5]
    assert region_psnr(pred, target, band).item() == float("inf")  # nothing changed next to this hole
    assert region_ssim(target, target, hole).item() == pytest.approx(1.0, abs=1e-6)
    assert region_ssim(pred, target, hole).item() < 0.5
    assert torch.isnan(region_psnr(pred, target, torch.zeros_like(hole)))  # an empty region has nothing to score
    s = scores(tiny_vae, pred, target, hole, seam_width=2)
    assert s["hole_psnr"].item() == pytest.approx(10 * np.log10(4), abs=1e-4) and s["seam_psnr"].item() == float("inf")
    assert s["reencoded_known_psnr"].item() < s["known_psnr"].item()  # one more lossy pass through the VAE


def test_a_run_directory_is_the_one_positional_argument():
    assert positional_run_dir(["/tmp/it's here", "steps=5"]) == ["run_dir='/tmp/it\\'s here'", "steps=5"]
    assert positional_run_dir(["run_dir=x", "--help"]) == ["run_dir=x", "--help"]
    with pytest.raises(GloError, match="one run directory, got 2"):
        positional_run_dir(["a", "b"])


def test_a_hub_model_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(GloError) as e:
        load_inpainter("sd_inpaint", pretrained="nobody/no-such-inpainting")
    assert "\n" not in str(e.value) and "not in the Hugging Face cache" in str(e.value)
    assert "inpainters.sd_inpaint.path=DIR" in str(e.value)
    with pytest.raises(GloError, match="unet/config.json: no such file"):
        load_inpainter("x", path=str(tmp_path))


def test_a_run_without_masks_is_refused_in_one_line(finished_run):
    p = run_glo(str(finished_run), module="glo.inpaint")
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0
    assert "exported without a mask" in p.stderr and "mask=boxes|strokes|folder" in p.stderr
    p = run_glo(module="glo.inpaint")
    assert p.returncode == 1 and "usage: python -m glo.inpaint RUN_DIR" in p.stderr


@pytest.mark.slow
def test_glo_inpaint_scores_both_conditionings_of_every_pipeline(masked_run, tmp_path):
    blend, inpaint = save_inpainter(tmp_path / "blend", 4), save_inpainter(tmp_path / "sd", 9)
    p = run_glo(str(masked_run), "inpainters=standin", f"inpainters.blend.path={blend}", f"inpainters.sd_inpaint_encoder.path={inpaint}",
                f"inpainters.sd_inpaint_glo.path={inpaint}", "steps=2", "batch_size=2", f"publish={tmp_path}/f.md",
                "section=test", module="glo.inpaint")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "accelerate" not in p.stderr and "torchvision" not in p.stderr  # install advice glo needs no part of
    out = masked_run / "inpaint"
    result = json.loads((out / "inpaint.json").read_text())
    rows = {(r["pipeline"], r["conditioning"]): r for r in result["rows"]}
    assert len(rows) == 6 and result["images"] == 3
    arrays = load_latents(masked_run / "latents.npz")
    for (name, cond), r in rows.items():
        assert r["kind"] == ("blend" if name == "blend" else "sd_inpaint")
        if cond == "encoder":
            assert r["known_psnr_vs_encoder"] == 0 and r["drift_distance"] == 0
            assert r["spread_ratio"] == pytest.approx(1.0, abs=1e-6)
        else:
            read = arrays["latents" if name == "blend" else "masked_latents"]
            initial = arrays["initial_latents" if name == "blend" else "initial_masked_latents"]
            distance = np.linalg.norm((read - initial).reshape(3, -1), axis=1) / np.linalg.norm(
                initial.reshape(3, -1), axis=1)
            assert r["drift_distance"] == pytest.approx(distance.mean(), rel=1e-6) and r["drift_distance"] > 0
            base = rows[(name, "encoder")]
            assert r["known_psnr_vs_encoder"] == pytest.approx(r["known_psnr"] - base["known_psnr"], abs=1e-9)
    # the same model under two names, fed the same latents and noise: the same outputs
    assert rows[("sd_inpaint_encoder", "glo")]["hole_psnr"] == rows[("sd_inpaint_glo", "glo")]["hole_psnr"]
    assert rows[("blend", "glo")]["hole_psnr"] != rows[("sd_inpaint_glo", "glo")]["hole_psnr"]
    for name in ("blend", "sd_inpaint_glo"):
        assert len(list((out / "images" / name / "glo").glob("*.png"))) == 3 and (out / f"grid_{name}.png").is_file()
    published = (tmp_path / "f.md").read_text()
    assert "<!-- glo.inpaint test -->" in published and "| blend | glo |" in published
    assert "mask.kind=boxes mask.seed=0" in result["run_made_by"] and result["run_made_by"] in published
    assert "LPIPS skipped" in published or "| lpips |" in published


@pytest.mark.slow
def test_a_trained_unet_denoises_latents_it_never_saw_better_than_an_untrained_one(masked_run, tmp_path):
    p = run_glo(f"runs=[{masked_run}]", "trainer.max_steps=40", "lr=2e-3", "warmup_steps=5", "held_out=0.3",
                "batch_size=2", f"run_dir={tmp_path}/train", "name=t", module="glo.train_inpaint")
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "train" / "train.json").read_text())
    assert result["held_out_loss_trained"] < 0.8 * result["held_out_loss_untrained"]
    assert len(result["held_out_ids"]) == 1 and result["train_images"] == 2
    loaded = load_inpainter("t", path=str(tmp_path / "train" / "t"))
    assert loaded.kind == "sd_inpaint" and next(loaded.unet.parameters()).dtype == torch.float32
    assert loaded.trained_on == "tiny_random"  # the masked run's VAE, from its metadata
    _, held, _ = split([str(masked_run)], "encoder", 0.3)
    assert held_out_loss(loaded.unet, DDPMScheduler(**OmegaConf.to_container(TRAIN.scheduler)), held, 0) == \
        pytest.approx(result["held_out_loss_trained"], rel=1e-2)  # fp16 on disk changes the loss by little


def test_the_split_keeps_the_last_ids_of_each_run_out_and_picks_the_conditioning(masked_run):
    arrays = load_latents(masked_run / "latents.npz")
    order = np.argsort(arrays["ids"])
    for latents, (key, masked_key) in (("encoder", ("initial_latents", "initial_masked_latents")),
                                       ("glo", ("latents", "masked_latents"))):
        train, held, ids = split([str(masked_run)], latents, 0.3)
        assert ids == [f"{masked_run}:{arrays['ids'][order[-1]]}"]
        assert torch.equal(held["latent"][0], torch.from_numpy(arrays[key][order[-1]]))
        assert torch.equal(held["masked_latent"][0], torch.from_numpy(arrays[masked_key][order[-1]]))
        assert torch.equal(train["mask"], torch.from_numpy(arrays["latent_masks"][order[:-1]]))
    with pytest.raises(GloError, match="latents=pixels"):
        split([str(masked_run)], "pixels", 0.1)


@pytest.mark.parametrize("asset", ["inpaint_blend", "inpaint_encoder", "inpaint_glo"])
def test_the_shipped_unets_denoise_stand_in_latents_of_photos_they_never_saw(asset):
    from glo.model.vae import load_vae

    vae = load_vae("standin", asset="standin_vae")
    model = load_inpainter(asset, asset=asset)
    x = photos(4, size=128)
    z = vae.encode(x)
    mask = torch.zeros(4, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1
    masked = vae.encode(x * (1 - mask.repeat_interleave(8, 2).repeat_interleave(8, 3)))
    held = {"latent": z, "mask": mask, "masked_latent": masked}
    scheduler = DDPMScheduler.from_pretrained(ROOT / "glo/standin" / asset / "scheduler")
    untrained = random_unet(model.unet.config.in_channels)
    assert held_out_loss(model.unet, scheduler, held, 0) < 0.3 * held_out_loss(untrained, scheduler, held, 0)


def test_a_pipeline_directory_with_a_text_encoder_conditions_on_its_prompt(tmp_path):
    """What inpainters=sd loads from a local SD directory: unet/, scheduler/, text_encoder/, tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    save_inpainter(tmp_path, 9)
    words = ["a", "b"]  # one-letter words: a BPE vocabulary without merges still knows them
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{f"{w}</w>": i + 2 for i, w in enumerate(words)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8).save_pretrained(
        tmp_path / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8)).save_pretrained(
        tmp_path / "text_encoder")
    ab, ba = (load_inpainter("sd_inpaint", path=str(tmp_path), prompt=p) for p in ("a b", "b a"))
    assert ab.kind == "sd_inpaint" and ab.condition.shape == (1, 8, 32)
    assert not torch.equal(ab.condition, ba.condition)


def test_a_unet_trains_on_the_runs_of_one_vae_only(tmp_path):
    from glo.train.inpaint import vae_name

    runs = []
    for name in ("taesd", "standin", "taesd"):
        run = tmp_path / f"run{len(runs)}"
        run.mkdir()
        (run / "metadata.json").write_text(json.dumps({"vae": {"name": name}}))
        runs.append(str(run))
    assert vae_name([runs[0], runs[2]]) == "taesd"
    with pytest.raises(GloError, match=r"made with 2 VAEs \(standin, taesd\); a UNet learns one latent space"):
        vae_name(runs)


def test_each_region_is_scored_where_it_lies_the_re_encoded_one_on_the_known_pixels():
    """Through a lossless codec, an output that differs from the input only inside the hole is perfect on the known
    region and the seam, also after the re-encode, and imperfect on the hole."""
    from types import SimpleNamespace

    from glo.data.pixels import to_8bit

    lossless = SimpleNamespace(encode=lambda x: x, decode=lambda z: z)
    x = to_8bit(photos(1, 32))
    hole = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    hole[..., 8:16, 8:16] = True
    y = torch.where(hole, -x, x)
    s = scores(lossless, y, x, hole, 2)
    assert torch.isinf(s["known_psnr"]).all() and torch.isinf(s["seam_psnr"]).all()
    assert torch.isinf(s["reencoded_known_psnr"]).all() and torch.isfinite(s["hole_psnr"]).all()
