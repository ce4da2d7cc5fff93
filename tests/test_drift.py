"""Drift of optimized latents from the encoder's: metrics against hand-computed values, and the two
options that limit it (a pull toward the encoder's latent, a larger Adam eps)."""
import math

import numpy as np
import pytest
import torch

from glo import GloError
from glo.method.drift import (
    drift,
    high_frequency_share,
    pooled_channel_stats,
    pooled_covariance,
    spread_ratio,
)
from glo.method.engine import optimize
from glo.method.losses import PixelLoss
from glo.store.summary import drift_summary
from tests.conftest import photos, settings

L2 = PixelLoss("l2", l1=0.0, l2=1.0)
i, j = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
CHECKER = (-1.0) ** (i + j)                 # all power at (0.5, 0.5) cycles per cell: above half Nyquist
SLOW = torch.cos(2 * math.pi * i / 8)      # all power at 0.125 cycles per cell: below


def test_high_frequency_share_by_hand():
    z = torch.stack([CHECKER, SLOW, 2 * SLOW + 5, torch.zeros(8, 8)])[None]  # one latent, four channels
    # power: checkerboard 1 per cell, each cosine of amplitude a holds a^2 / 2 per cell (constants removed)
    assert high_frequency_share(z).item() == pytest.approx(1 / (1 + 0.5 + 2), abs=1e-6)
    assert high_frequency_share(CHECKER.expand(1, 4, 8, 8)).item() == pytest.approx(1.0)
    assert high_frequency_share(SLOW.expand(1, 4, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)
    assert high_frequency_share(torch.full((1, 4, 8, 8), 3.0)).item() == 0.0  # no variation, no power
    assert high_frequency_share(0.001 * CHECKER.expand(1, 4, 8, 8)).item() == pytest.approx(1.0)  # tiny, still all high
    batch = torch.stack([CHECKER, SLOW])[:, None].expand(2, 4, 8, 8)  # each latent's share is its own
    assert high_frequency_share(batch).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    at_half = torch.cos(2 * math.pi * i / 4)  # exactly 0.25 cycles per cell: not above half Nyquist
    assert high_frequency_share(at_half.expand(1, 4, 8, 8)).item() == pytest.approx(0.0, abs=1e-6)
    r, c = torch.meshgrid(torch.arange(8.0), torch.arange(16.0), indexing="ij")
    wide = ((-1.0) ** (r + c) + torch.cos(2 * math.pi * r / 8)).expand(1, 4, 8, 16)  # non-square latent
    assert high_frequency_share(wide).item() == pytest.approx(1 / (1 + 0.5), abs=1e-6)


def test_drift_by_hand():
    z0 = torch.ones(2, 4, 8, 8)
    z = torch.stack([3 * torch.ones(4, 8, 8), 1 + CHECKER.expand(4, 8, 8)])
    d = drift(z, z0, reencoded=torch.stack([z[0], torch.zeros(4, 8, 8)]))
    assert d["drift_distance"].tolist() == pytest.approx([2.0, 1.0])  # ||2|| / ||1||, ||checker|| / ||1||
    assert d["reencode_error"].tolist() == pytest.approx([0.0, 1.0])  # E(D(z)) = z; E(D(z)) = 0
    assert torch.allclose(d["channel_mean"], torch.tensor([[3.0] * 4, [1.0] * 4]))
    assert torch.allclose(d["channel_std"], torch.tensor([[0.0] * 4, [1.0] * 4]))
    assert d["hf_share"].tolist() == pytest.approx([0.0, 1.0])


def test_pooled_channel_stats_are_those_of_every_element():
    rng = np.random.default_rng(0)
    z = rng.normal(rng.normal(size=(5, 3, 1, 1)), rng.uniform(0.5, 2, (5, 3, 1, 1)), (5, 3, 6, 6))
    for scale in (1.0, 0.01):  # also spreads below 1
        mean, std = pooled_channel_stats(scale * z.mean((2, 3)), scale * z.std((2, 3)))
        assert np.allclose(mean, scale * z.mean((0, 2, 3))) and np.allclose(std, scale * z.std((0, 2, 3)))


def test_drift_summary_pools_over_the_run():
    a = {"drift_distance": np.array([1.0, 3.0]),
         **{f"{k}_{w}": np.array([0.1, 0.3]) * (2 if w == "final" else 1) for k in ("hf_share", "reencode_error")
            for w in ("initial", "final")},
         "channel_mean_initial": np.array([[0.0], [2.0]]), "channel_std_initial": np.array([[1.0], [1.0]]),
         "channel_mean_final": np.array([[0.0], [0.0]]), "channel_std_final": np.array([[3.0], [4.0]])}
    s = drift_summary(a)
    assert s["drift_distance_mean"] == 2.0 and s["hf_share_final_mean"] == pytest.approx(0.4)
    assert s["channel_mean_initial"] == [1.0] and s["channel_std_initial"] == pytest.approx([math.sqrt(2)])
    assert s["channel_std_final"] == pytest.approx([math.sqrt(12.5)])


def _run(tiny_vae, **changes):
    x = photos(2)
    z0 = tiny_vae.encode(x)
    return z0, optimize(tiny_vae.decode, z0, x, L2, settings(lr=0.1, max_steps=12, rel_tol=0.0, **changes))


def _distance(z, z0):
    return ((z - z0).flatten(1).norm(dim=1) / z0.flatten(1).norm(dim=1))


def test_the_anchor_pulls_toward_the_encoders_latent(tiny_vae):
    z0, free = _run(tiny_vae)
    _, zero = _run(tiny_vae, anchor=0.0)
    _, some = _run(tiny_vae, anchor=1.0)
    _, huge = _run(tiny_vae, anchor=1e6)
    assert torch.equal(zero.latents, free.latents)  # weight 0 is today's method, bit for bit
    assert (_distance(some.latents, z0) < _distance(free.latents, z0)).all()
    assert _distance(huge.latents, z0).max() < 0.05 * _distance(free.latents, z0).min()  # held at z0
    assert (some.final_loss < some.initial_loss).all()  # and it still fits


def test_a_larger_adam_eps_moves_less(tiny_vae):
    z0, free = _run(tiny_vae, eps=3e-4)
    _, damped = _run(tiny_vae, eps=3.0)
    assert (_distance(damped.latents, z0) < _distance(free.latents, z0)).all()
    assert (damped.final_loss < damped.initial_loss).all()


def test_the_default_keeps_latents_closer_to_the_encoders_than_plain_adam(tiny_vae):
    """The configured default (conf/run.yaml) against torch's eps at 256 px: less drift, still a fit."""
    x = photos(2)
    z0 = tiny_vae.encode(x)
    default = optimize(tiny_vae.decode, z0, x, L2, settings(rel_tol=0.0))
    plain = optimize(tiny_vae.decode, z0, x, L2, settings(rel_tol=0.0, eps=3e-4))
    d_default, d_plain = (drift(r.latents, z0, r.latents) for r in (default, plain))
    assert (d_default["drift_distance"] < 0.99 * d_plain["drift_distance"]).all()  # a random decoder responds evenly
    assert (default.final_loss < default.initial_loss).all()


def test_the_posterior_anchor_holds_what_the_encoder_is_sure_of():
    """Mahalanobis pull: a channel with a broad posterior moves freely, a certain one stays at z0."""
    z0 = torch.zeros(1, 2, 4, 4)
    z0_std = torch.stack([torch.ones(4, 4), torch.full((4, 4), 0.01)])[None]  # unsure, sure
    target = torch.ones(1, 2, 4, 4)  # the loss wants every element at 1
    loss = lambda pred, tgt: (pred - tgt).square().mean((1, 2, 3))
    kw = dict(lr=0.05, max_steps=40, rel_tol=0.0, anchor=1.0, eps=1e-8)
    post = optimize(lambda z: z, z0, target, loss, settings(**kw, anchor_to="posterior"), z0_std=z0_std).latents
    flat = optimize(lambda z: z, z0, target, loss, settings(**kw, anchor_to="z0"), z0_std=z0_std).latents
    # weights 1 / scale^2 average 1: 2e-4 on the unsure channel, 2 on the certain one, which settles at 1 / (1 + 2)
    assert post[0, 0].mean() > 0.9 and (post[0, 1] - 1 / 3).abs().max() < 0.05
    assert torch.allclose(flat[0, 0], flat[0, 1])  # scale 1: both channels alike
    with pytest.raises(GloError, match="deterministic"):
        optimize(lambda z: z, z0, target, loss, settings(**kw, anchor_to="posterior"))


@pytest.mark.parametrize("std", [2.0**-7, 1.0, 2.0**5])  # an SD encoder's std is ~0.01: its size must not matter
def test_the_posterior_anchor_is_as_strong_as_the_z0_anchor_on_average(std):
    """Only the shape of the encoder's doubt weighs: where it is even, the posterior pull is exactly z0's (powers
    of two keep the mean exact), so one `anchor` value means the same for both."""
    torch.manual_seed(0)
    z0, target = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    loss = lambda pred, tgt: (pred - tgt).square().mean((1, 2, 3))
    kw = dict(lr=0.05, max_steps=10, rel_tol=0.0, anchor=0.5, anderson=0)
    post = optimize(lambda z: z, z0, target, loss, settings(**kw, anchor_to="posterior"),
                    z0_std=torch.full_like(z0, std))
    plain = optimize(lambda z: z, z0, target, loss, settings(**kw, anchor_to="z0"))
    assert torch.equal(post.latents, plain.latents) and not torch.equal(plain.latents, z0)


def test_the_posterior_anchor_of_an_image_does_not_depend_on_its_batch_mates():
    """Each image's weights are normalised by its own posterior, not the batch's: the same image alone or beside
    one the encoder is far less sure of ends at the same latent."""
    torch.manual_seed(0)
    z0, target, std = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4), torch.rand(2, 2, 4, 4) + 0.01
    std[1] *= 100
    loss = lambda pred, tgt: (pred - tgt).square().mean((1, 2, 3))
    s = settings(lr=0.05, max_steps=10, rel_tol=0.0, anchor=0.5, anderson=0, anchor_to="posterior")
    both = optimize(lambda z: z, z0, target, loss, s, z0_std=std).latents
    alone = optimize(lambda z: z, z0[:1], target[:1], loss, s, z0_std=std[:1]).latents
    assert torch.allclose(both[:1], alone, rtol=1e-6, atol=1e-6) and not torch.equal(alone, z0[:1])


def test_the_spread_ratio_is_the_largest_std_ratio_along_any_direction_whatever_the_coordinates():
    """Stretching the latents 2x along one direction gives 2 in any coordinates; the per-channel ratio sees it only
    where that direction is a channel (a VAE whose channels are mixed by a rotation hides it there)."""
    cov0 = np.diag([0.01, 1.0, 4.0, 0.25])
    v = np.array([1.0, 0, 0, 0])
    cov = cov0 + 3 * cov0[0, 0] * np.outer(v, v)  # the variance along channel 0 x4: its std x2
    q = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0]
    assert spread_ratio(cov0, cov0) == pytest.approx(1.0)
    assert spread_ratio(cov, cov0) == pytest.approx(2.0) and spread_ratio(q @ cov @ q.T, q @ cov0 @ q.T) == pytest.approx(2.0)
    per_channel = np.sqrt(np.diag(q @ cov @ q.T) / np.diag(q @ cov0 @ q.T)).max()
    assert per_channel < 1.5  # what the per-channel figure reports for the same latents, rotated
    assert spread_ratio(cov, np.diag([0.0, 1, 1, 1])) == math.inf  # no encoder spread in some direction


def test_pooled_covariance_is_the_covariance_of_every_cell_of_the_run():
    z = torch.randn(3, 4, 5, 6) * torch.tensor([0.2, 1, 2, 3]).view(1, 4, 1, 1) + 0.5
    d = drift(z, z, z)
    cov = pooled_covariance(d["channel_mean"].numpy(), d["channel_moment"].numpy())
    every_cell = z.permute(1, 0, 2, 3).flatten(1).double().numpy()
    np.testing.assert_allclose(cov, np.cov(every_cell, bias=True), rtol=1e-4, atol=1e-5)


def test_a_runs_spread_ratio_bounds_every_channels_std_ratio(tiny_vae):
    """The largest ratio along any direction is at least the ratio along each channel: summary.json carries both."""
    from glo.method.fit import fit_batch
    from glo.store.summary import summarize

    rows = fit_batch(tiny_vae, photos(2, 32), settings(max_steps=6, eps=1e-6, lr=0.5), L2).arrays
    s = summarize({**rows, "ids": np.array(["a", "b"]), "seconds": np.ones(2)})
    per_channel = max(a / b for a, b in zip(s["channel_std_final"], s["channel_std_initial"]))
    assert s["spread_ratio_max"] >= per_channel * (1 - 1e-4) and s["spread_ratio_max"] > 1.0
