import pytest
import torch

from glo import GloError
from glo.method.losses import PixelLoss, l1, l2, l2_residual


def test_l1_l2_match_hand_computed_values():
    pred = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    target = torch.zeros_like(pred)
    assert torch.allclose(l1(pred, target), torch.tensor([(1 + 1 + 0.5 + 0) / 4, 0.0]))
    assert torch.allclose(l2(pred, target), torch.tensor([(1 + 1 + 0.25 + 0) / 4, 0.0]))


def test_weighted_sum_and_shape():
    pred, target = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    mixed = PixelLoss("l1_l2", l1=0.5, l2=2.0)(pred, target)
    assert mixed.shape == (3,)
    assert torch.allclose(mixed, 0.5 * l1(pred, target) + 2.0 * l2(pred, target))


def test_per_sample_loss_does_not_depend_on_batch():
    pred, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    loss = PixelLoss("l2", l1=0.0, l2=1.0)
    assert torch.allclose(loss(pred, target)[1:2], loss(pred[1:2], target[1:2]))


@pytest.mark.parametrize("w1,w2", [(0.0, 0.0), (-1.0, 1.0), ("abc", 1.0), (1.0, True)])
def test_bad_weights_are_rejected(w1, w2):
    with pytest.raises(GloError, match="weights"):
        PixelLoss("bad", l1=w1, l2=w2)


@pytest.mark.parametrize("scale", [0, -1.0, "abc", float("nan")])
def test_a_bad_scale_is_rejected(scale):
    with pytest.raises(GloError, match=f"loss.scale={scale!r}: must be a number > 0"):
        PixelLoss("l2", l1=0.0, l2=1.0, scale=scale)


def test_scale_multiplies_the_loss():
    pred, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    plain, scaled = PixelLoss("l1_l2", 0.5, 0.5), PixelLoss("l1_l2", 0.5, 0.5, scale=8.0)
    assert torch.equal(scaled(pred, target), 8.0 * plain(pred, target))


@pytest.mark.parametrize("w1,w2", [(1.0, 0.0), (0.0, 0.5), (0, 2)])
def test_any_non_negative_weights_are_allowed(w1, w2):
    loss = PixelLoss("ok", l1=w1, l2=w2)
    assert (loss.w1, loss.w2) == (w1, w2)


def test_a_weighted_loss_is_reduced_per_sample():
    """Changing one sample's prediction must leave every other sample's loss bit for bit unchanged."""
    torch.manual_seed(0)
    pred, target = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    weight = (torch.rand(3, 1, 8, 8) > 0.3).float()
    for loss in (l1, l2):
        before = loss(pred, target, weight)
        changed = pred.clone()
        changed[1] += 5
        after = loss(changed, target, weight)
        assert after[1] != before[1] and torch.equal(after[[0, 2]], before[[0, 2]])
    err = (pred - target).square()  # each sample's mean over its own known pixels, whatever the others hold
    by_hand = torch.stack([err[i][weight[i].expand_as(err[i]) > 0].mean() for i in range(3)])
    assert torch.allclose(l2(pred, target, weight), by_hand)


def test_the_l2_residual_squares_to_the_l2_loss():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.allclose(l2_residual(pred, target).square().sum(1), l2(pred, target), rtol=1e-5)
    weight = (torch.rand(3, 1, 8, 8) > 0.4).float() * torch.tensor([1.0, 0.5, 2.0])[:, None, None, None]
    holed = torch.where(weight == 0, float("nan"), target)  # whatever the masked pixels hold
    assert torch.allclose(l2_residual(pred, holed, weight).square().sum(1), l2(pred, holed, weight), rtol=1e-5)
