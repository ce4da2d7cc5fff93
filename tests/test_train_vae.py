"""glo.train_vae: a few steps on tiny crops resume and export a loadable VAE; bad input fails before any model."""
import numpy as np
import pytest
import torch
from PIL import Image

from glo.model.vae import load_vae
from glo.train.vae import trainer_precision
from tests.conftest import photos, run_glo

TINY = ["vae.block_out_channels=[8,8,16,16]", "vae.norm_num_groups=4", "crop=32", "crops_per_epoch=8",
        "batch_size=4", "num_workers=0", "val_data.size=32", "val_data.limit=2", "scale_data.size=32",
        "warmup_steps=1", "checkpoint_every=2", "precision=fp32"]


def image_folder(root, n=3):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_few_steps_train_resume_and_export(tmp_path):
    data = image_folder(tmp_path / "train")
    args = [*TINY, f"data.train={data}", f"val_data.path={data}", f"run_dir={tmp_path / 'run'}"]
    first = run_glo(*args, "trainer.max_steps=2", module="glo.train_vae")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    again = run_glo(*args, "trainer.max_steps=4", module="glo.train_vae")  # resumes from step 2
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restored" in again.stderr + again.stdout or "restored" in again.stderr + again.stdout
    vae = load_vae("trained", path=str(tmp_path / "run" / "standin_vae"))
    assert vae.scaling_factor != 1.0  # replaced by 1 / std of the training latents
    x = photos(1, size=32)
    assert vae.encode(x).shape == (1, 4, 4, 4) and vae.decode(vae.encode(x)).shape == x.shape


@pytest.mark.parametrize("override,message", [
    ("data.train=MISSING", "data.train=MISSING: no such directory"),
    ("data.train=EMPTY", "data.train=EMPTY: no image files"),
    ("val_data.path=MISSING", "val_data.path=MISSING: no such directory"),
    ("crop=36", "crop=36: must be a multiple of 8"),
    ("precision=bf16-mixed", "precision=bf16-mixed: must be one of auto, fp32, bf16, fp16"),
])
def test_bad_input_fails_in_one_line_before_any_model(tmp_path, override, message):
    (tmp_path / "empty").mkdir()
    data = image_folder(tmp_path / "train")
    paths = {"MISSING": str(tmp_path / "missing"), "EMPTY": str(tmp_path / "empty")}
    for name, path in paths.items():
        override, message = override.replace(name, path), message.replace(name, path)
    p = run_glo(*TINY, f"data.train={data}", override, f"run_dir={tmp_path / 'run'}", module="glo.train_vae")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and message in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_fresh_encoder_trains_a_new_encoder_against_the_frozen_decoder(tmp_path):
    data = image_folder(tmp_path / "train")
    base = [*TINY, f"data.train={data}", f"val_data.path={data}"]
    first = run_glo(*base, "trainer.max_steps=2", f"run_dir={tmp_path / 'a'}", module="glo.train_vae")
    assert first.returncode == 0, first.stderr[-3000:]
    p = run_glo(*base, "trainer.max_steps=2", f"init_from={tmp_path / 'a' / 'standin_vae'}", "fresh_encoder=true",
                f"run_dir={tmp_path / 'b'}", module="glo.train_vae")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (load_vae(n, path=str(tmp_path / n / "standin_vae")).model for n in "ab")
    for name, w in a.decoder.state_dict().items():
        assert torch.equal(w, b.decoder.state_dict()[name]), name  # the decoder is untouched
    assert not torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)


@pytest.mark.parametrize("native,expected", [(False, "32-true"), (True, "bf16-mixed")])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr("glo.model.hardware.cpu_native_bf16", lambda: native)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
    assert trainer_precision("auto") == expected
    assert trainer_precision("fp16") == "16-mixed"  # forced, whatever the CPU
