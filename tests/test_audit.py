"""Tests for one-line bugs that a mutation audit found no other test would catch: each names the bug it stops."""
import json

import numpy as np
import pytest
import torch

from glo.latents import LatentDataset, load_latents
from glo.method.anderson import mix
from glo.method.drift import high_frequency_share
from glo.method.engine import optimize
from glo.method.losses import l2
from glo.method.samples import flat
from glo.method.settings import Settings
from glo.store.export import shard_problem
from glo.store.rundir import fingerprint
from tests.conftest import run_config, settings
from tests.test_export import batch, export


def test_the_stopping_rule_compares_with_the_loss_window_steps_back():
    """Catches curve[t - 1] for curve[t - window]: the last step changed little, the window much."""
    curve = torch.tensor([1.0, 0.9, 0.8, 0.79, 0.789])
    assert not flat(curve, 4, window=3, rel_tol=0.05)  # 0.9 -> 0.789: 12 %
    assert flat(curve, 4, window=1, rel_tol=0.05)  # 0.79 -> 0.789
    assert flat(curve, 4, window=3, rel_tol=0.124) and not flat(curve, 2, window=3, rel_tol=1.0)


class _Flat(torch.autograd.Function):
    """A decoder whose output never changes but whose gradient is the identity: every step ties the loss."""

    @staticmethod
    def forward(ctx, z):
        return torch.zeros(z.shape[0], 4, *z.shape[2:])

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_a_later_latent_with_only_an_equal_loss_does_not_replace_the_best():
    """Catches `<=` for `<` in the best-latent bookkeeping: the latents move, the loss stays, z0 is kept."""
    z0, target = torch.randn(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    r = optimize(_Flat.apply, z0, target, l2, settings(lr=0.1, max_steps=3, rel_tol=0.0, anderson=0))
    assert torch.equal(r.latents, z0) and r.steps.tolist() == [3, 3]


def test_every_setting_of_the_method_is_in_the_fingerprint():
    """Catches a Settings field (eps, anderson, ...) left out: its rows would mix on resume."""
    keys = fingerprint(run_config(), ["a"], "fp32")
    assert [name for name in Settings.model_fields if name not in keys] == []


def test_a_flipped_byte_inside_a_shard_is_found_by_its_crc(tmp_path):
    """Catches the shard CRC check removed: the file still parses, only the CRC sees the change."""
    export(tmp_path, [batch(["a", "b"], 0)])
    shard = next((tmp_path / "shards").glob("shard-*.npz"))
    data = bytearray(shard.read_bytes())
    data[data.index(load_latents(shard)["latents"][:1].tobytes()[:64]) + 10] ^= 0x01
    shard.write_bytes(data)
    ids = json.loads((tmp_path / "shards" / "manifest-0.json").read_text())[shard.name]
    digests = {i: h for i, h in zip(ids, ["x", "y"])}
    assert shard_problem(shard, ids, digests).startswith("damaged (latents.npy fails its checksum")


def test_a_shard_holding_other_ids_than_its_manifest_is_not_trusted(tmp_path):
    export(tmp_path, [{**batch(["a", "b"], 0), "source_sha256": np.array(["x", "y"])}])
    shard = next((tmp_path / "shards").glob("shard-*.npz"))
    assert shard_problem(shard, ["a", "b"], {"a": "x", "b": "y"}) is None
    assert shard_problem(shard, ["b", "a"], {"a": "x", "b": "y"}) == "holds other images than its manifest lists"
    assert "'b' has changed" in shard_problem(shard, ["a", "b"], {"a": "x", "b": "z"})


def test_latent_dataset_keeps_the_files_order(tmp_path):
    """Catches ids reordered (sorted) apart from their rows: item i is row i, with its own id."""
    b = batch(["z", "a", "m"], 0)
    export(tmp_path, [b])
    ds = LatentDataset(tmp_path / "latents.npz")
    assert ds.ids == ["z", "a", "m"]
    for i in range(3):
        assert ds[i]["id"] == b["ids"][i] and torch.equal(ds[i]["latent"], torch.from_numpy(b["latents"][i]))


def test_the_high_frequency_share_splits_at_half_nyquist():
    """Catches the threshold moved: a wave just above 0.25 cycles per cell is all high, just below all low."""
    n = 32
    x = torch.arange(n, dtype=torch.float32)
    for cycles, share in ((0.25 + 1 / n, 1.0), (0.25 - 1 / n, 0.0)):  # the documented 0.25, not the constant
        wave = torch.cos(2 * torch.pi * cycles * x).expand(1, 1, n, n)
        assert high_frequency_share(wave).item() == pytest.approx(share, abs=1e-6)


def test_the_posterior_std_is_in_sd_units(tiny_vae):
    """Catches the std left unscaled: it must scale with the mean by the VAE's scaling factor."""
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = tiny_vae.model.encode(x).latent_dist
        mean, std = tiny_vae.posterior(x)
    assert torch.allclose(std, dist.std * tiny_vae.scaling_factor)
    assert tiny_vae.scaling_factor != 1.0  # else the test could not tell


def test_andersons_regularization_is_relative_to_the_residuals():
    """Catches `reg` made absolute: scaling every residual by 1e-6 must not change the mixing weights."""
    torch.manual_seed(0)
    hist = [(torch.randn(6), torch.randn(10), torch.randn(6)) for _ in range(3)]
    small = [(z, r * 1e-6, g) for z, r, g in hist]
    assert torch.allclose(mix(hist, reg=0.1)[0], mix(small, reg=0.1)[0], atol=1e-5)
    assert not torch.allclose(mix(hist, reg=0.1)[0], mix(hist, reg=0.0)[0], atol=1e-3)  # reg matters at all



def test_the_reencode_drift_encodes_the_decode_clamped_to_an_image(tiny_vae, monkeypatch):
    """Catches the clamp dropped: the re-encode asks what the latent becomes as an image, and an image lies in
    [-1,1]; the decode itself stays unclamped (the loss needs gradients on saturated pixels)."""
    from glo.method.fit import fit_batch

    decode, encode, seen = tiny_vae.decode, tiny_vae.encode, []
    monkeypatch.setattr(tiny_vae, "decode", lambda z: 3 * decode(z))  # saturated far past [-1,1]
    monkeypatch.setattr(tiny_vae, "encode", lambda x: seen.append(x) or encode(x))
    fitted = fit_batch(tiny_vae, torch.rand(1, 3, 32, 32) * 2 - 1, settings(max_steps=2), l2)
    assert fitted.final.abs().max() > 1.5  # the decode is unclamped
    assert [float(x.abs().max()) for x in seen[-2:]] == [1.0, 1.0]  # the re-encodes: clamped
